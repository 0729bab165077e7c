"""Count the operations that make the host wait for the device, at the dispatcher.

On a GPU each of these blocks the Python thread until the queued kernels finish: reading a value
(``.item()``, ``bool(t)``, ``.tolist()``), ops whose output shape depends on values (``nonzero``,
``masked_select``, ``unique``), LAPACK-style error checks (``torch.linalg.inv`` checks its ``info`` on the host)
and copies between devices. On the CPU they are cheap, but they are the same calls, so counting them here tells
what a CUDA step would do. ``Tensor.tolist`` does not pass through the dispatcher and is counted by a patch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..runtime.upstream import torch_dispatch_mode

__all__ = ["HostSyncCounter", "count_host_syncs"]

# aten op names (overload packets) that read device values on the host or size their output from them
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
        "_linalg_check_errors",  # torch.linalg.inv / cholesky / solve error checks
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "equal",
        "is_nonzero",
        "repeat_interleave",
        "bincount",
        "histc",
    }
)


class HostSyncCounter(torch_dispatch_mode()):
    """A dispatch mode that records each host-synchronising op it sees (``.counts``: op name -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.counts[name] += 1
        elif name in ("_to_copy", "copy_") and _crosses_devices(name, args, kwargs):
            self.counts[f"{name} across devices"] += 1
        return func(*args, **kwargs)


def _crosses_devices(name: str, args, kwargs) -> bool:
    source = args[1] if name == "copy_" else args[0]
    target = args[0].device if name == "copy_" else kwargs.get("device")
    return isinstance(source, torch.Tensor) and target is not None and torch.device(target) != source.device


@contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """``with count_host_syncs() as counter: ...`` then ``counter.total`` / ``counter.counts``."""
    counter = HostSyncCounter()
    original_tolist = torch.Tensor.tolist

    def tolist(tensor):
        counter.counts["tolist"] += 1
        return original_tolist(tensor)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = original_tolist
