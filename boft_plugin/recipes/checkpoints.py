"""Trainer checkpoints that survive kills: completion markers, rotation of complete ones, what to resume from.

The Trainer writes ``checkpoint-N/`` in place (adapter, optimizer, scheduler, RNG, DeepSpeed shards, state) and
``resume_from_checkpoint=True`` takes the highest ``N`` found, complete or not; its own rotation may delete the
previous checkpoint before every rank has finished the new one. Here:

- after each save every rank waits, then rank 0 writes a completion marker (atomically) and only then rotates
  (``callbacks.CompleteCheckpoints``; ``save_total_limit`` counts complete checkpoints);
- :func:`resolve_resume` picks the newest *complete* checkpoint (a run killed during a save resumes from the one
  before), and removes incomplete ones newer than it.

Resuming on another number of ranks: ``dcp_checkpoints`` (FSDP2) and ``universal_checkpoints`` (DeepSpeed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..distributed.gather import barrier, rank, world_size
from .errors import RecipeError

COMPLETE_MARKER = "boft_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), root / name) for name in os.listdir(root) if (m := _CHECKPOINT.match(name))]
    return sorted(p for p in found if p[1].is_dir())


def _read_marker(checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's completion marker ({} when absent or unreadable)."""
    try:
        marker = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether every rank finished writing this checkpoint (its completion marker is present and readable)."""
    return _read_marker(checkpoint).get("complete") is True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or None."""
    complete = [path for _, path in _checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def write_marker(checkpoint: Path, step: int) -> None:
    """Mark ``checkpoint`` complete (rank 0, after every rank finished writing it)."""
    payload = {"complete": True, "step": step, "world_size": world_size(), "time": time.time()}
    atomic_write_text(checkpoint / COMPLETE_MARKER, json.dumps(payload))


def rotate(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop older ones and incomplete ones older than the newest."""
    entries = _checkpoints(output_dir)
    complete = [step for step, path in entries if is_complete(path)]
    if not complete:
        return
    keep_steps = set(complete[-keep:]) if keep else set(complete)
    for step, path in entries:
        if step < complete[-1] and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_to_resume(value, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names (None: start afresh); raises :class:`RecipeError` for a path
    that does not exist or is incomplete. Reads only: ``train.prepare`` calls it before anything is written."""
    if value in (None, False, "", "false", "False"):
        return None
    if isinstance(value, bool) or str(value).lower() in ("true", "last", "latest", "auto"):
        return last_complete_checkpoint(output_dir)
    chosen = Path(value)
    if not chosen.is_dir():
        raise RecipeError(f"recipe key 'resume_from_checkpoint': {chosen} does not exist")
    if not is_complete(chosen):
        raise RecipeError(
            f"recipe key 'resume_from_checkpoint': {chosen} is incomplete (no {COMPLETE_MARKER}: the run was killed "
            f"while writing it); resume from {last_complete_checkpoint(chosen.parent) or 'scratch'} instead, e.g. "
            "with resume_from_checkpoint: auto"
        )
    return chosen


def resolve_resume(value, output_dir: str | os.PathLike):
    """Turn a recipe's ``resume_from_checkpoint`` into what ``Trainer.train`` takes.

    ``true`` / ``last`` / ``latest`` / ``auto``: the newest complete checkpoint in ``output_dir`` (None: start
    from scratch). A path: used as is, but refused if incomplete. Incomplete checkpoints newer than the one
    resumed from are removed (rank 0) so that the run can write them again.
    """
    if value in (None, False, "", "false", "False"):
        return None
    chosen = checkpoint_to_resume(value, output_dir)
    if rank() == 0:
        newest_kept = -1 if chosen is None else int(_CHECKPOINT.match(chosen.name).group(1))
        dropped = []
        for step, path in _checkpoints(output_dir):
            if step > newest_kept and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
                dropped.append(path.name)
        where = f"resuming from {chosen}" if chosen else f"no complete checkpoint in {output_dir}: starting afresh"
        note = f" (removed incomplete {', '.join(dropped)})" if dropped else ""
        print(f"[boft-plugin] {where}{note}", flush=True)
    barrier()
    return None if chosen is None else str(chosen)


def written_by_world_size(checkpoint: str | os.PathLike) -> int | None:
    """How many ranks wrote ``checkpoint`` (from its completion marker; None if it does not say)."""
    try:
        return int(_read_marker(checkpoint)["world_size"])
    except (KeyError, ValueError, TypeError):
        return None
