"""Who this process is in a distributed run, and the one way boft-plugin prints a per-rank line.

``rank`` / ``world_size`` / ``barrier`` read the initialised default process group (0 / 1 / no-op without one);
``local_rank`` / ``node_rank`` come from the launcher's environment (torch.distributed.run, accelerate and
DeepSpeed all set ``LOCAL_RANK``; ``GROUP_RANK`` / ``NODE_RANK`` name the node).
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

__all__ = [
    "barrier",
    "broadcast_object",
    "gather_objects",
    "local_rank",
    "log",
    "raise_if_any_rank_failed",
    "rank",
    "world_size",
]


def rank() -> int:
    """Global rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_rank() -> int:
    """Rank of this process on its node (``LOCAL_RANK``; 0 when unset or not a number)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def log(message: str, *, every_rank: bool = False, stream=None) -> None:
    """``[boft-plugin] ...`` from rank 0 (or ``[boft-plugin] rank N: ...`` from every rank), as one write.

    One ``write`` per line: ranks started by a launcher share its output pipe, and with ``PYTHONUNBUFFERED``
    ``print`` writes the text and the newline separately, so two ranks' lines would run into each other
    (docs/design.md, "Engines").
    """
    if not every_rank and rank() != 0:
        return
    prefix = f"[boft-plugin] rank {rank()}: " if every_rank else "[boft-plugin] "
    out = stream if stream is not None else sys.stdout
    out.write(f"{prefix}{message}\n")
    out.flush()


def gather_objects(value) -> list:
    """Collective: every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _describe(error: BaseException) -> tuple[str, str, str]:
    cls = type(error)
    return cls.__module__, cls.__qualname__, str(error)


def _rebuild(module: str, qualname: str, message: str, failed_rank: int) -> BaseException:
    """The same error class with the same message where that is safe to build, else a :class:`BoftExportError`."""
    import builtins
    import importlib

    from ..errors import BoftError, BoftExportError

    cls = None
    try:
        owner = builtins if module == "builtins" else importlib.import_module(module)
        cls = getattr(owner, qualname, None)
    except ImportError:
        pass
    builtin = module == "builtins" and isinstance(cls, type) and issubclass(cls, Exception)
    if cls is not None and (builtin or (isinstance(cls, type) and issubclass(cls, BoftError))):
        try:
            return cls(message)
        except TypeError:
            pass
    return BoftExportError(f"rank {failed_rank} failed: {qualname}: {message}")


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Collective: if any rank passes an error, every rank raises; no rank is left waiting in a later collective.

    Only picklable facts cross ranks (class name and message), so an error that cannot be pickled still reaches
    every rank as a message. The failing rank re-raises its own error (its traceback intact); the others raise the
    same class where it is one of boft-plugin's or a builtin one (else :class:`~boft_plugin.errors.BoftExportError`),
    naming the failed rank. Use it as a pre-flight check before collective work, and after it.
    """
    local = None if error is None else _describe(error)
    reports = gather_objects(local)
    if error is not None:
        raise error
    for failed_rank, report in enumerate(reports):
        if report is not None:
            raise _rebuild(*report, failed_rank)


def broadcast_object(value, src: int = 0):
    """Collective: rank ``src``'s ``value`` (picklable) on every rank (``value`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
