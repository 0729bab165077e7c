"""Trainer checkpoints a run owns: pending and completion markers, rotation of its own, and what a checkpoint is.

The Trainer writes ``checkpoint-N/`` in place (adapter, optimizer, scheduler, RNG, DeepSpeed shards, state) and would
resume from, or rotate away, any directory of that name. A run of boft-plugin instead:

- writes ``boft_checkpoint_pending.json`` into ``checkpoint-N/`` *before* the Trainer writes there (the run has
  started that checkpoint: it owns it), and ``boft_checkpoint_complete.json`` after every rank finished writing it
  (signed for this user, :mod:`.signing`); a checkpoint is complete when its completion marker matches its pending
  marker (same nonce);
- removes only checkpoints it owns: its *lineage* (a run id carried over by every resume of the same run) is in both
  markers. ``save_total_limit`` counts the lineage's complete checkpoints; a ``checkpoint-N`` without our markers
  (a stock Trainer's, another tool's) is never deleted, and never counted.

What to resume from is decided in :mod:`.resume`. Markers are written by the *checkpoint writer*: global rank 0, or
local rank 0 of every node with ``save_on_each_node`` (each node's disk holds its own copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ...runtime.atomic import atomic_write_text
from ...runtime.ranks import local_rank, rank
from .signing import sign, verify

__all__ = [
    "COMPLETE_MARKER",
    "PENDING_MARKER",
    "CheckpointInfo",
    "begin_checkpoint",
    "complete_checkpoint",
    "is_checkpoint_writer",
    "is_complete",
    "last_complete_checkpoint",
    "pickled_parts",
    "rotate",
    "scan_checkpoints",
    "step_of",
    "trainer_missing",
    "written_by_world_size",
]

COMPLETE_MARKER = "boft_checkpoint_complete.json"
PENDING_MARKER = "boft_checkpoint_pending.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class CheckpointInfo:
    """One ``checkpoint-N`` directory as found on disk (no file other than the markers is read)."""

    step: int
    path: Path
    complete_marker: dict = field(default_factory=dict)
    pending_marker: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> CheckpointInfo:
        return cls(step_of(path), path, _read(path / COMPLETE_MARKER), _read(path / PENDING_MARKER))

    @property
    def ours(self) -> bool:
        """Whether a run of boft-plugin started this checkpoint (either marker is present)."""
        return bool(self.complete_marker or self.pending_marker)

    @property
    def lineage(self) -> str | None:
        """The run that owns it (the pending marker's, which is the newer when both exist)."""
        return (self.pending_marker or self.complete_marker).get("lineage")

    @property
    def complete(self) -> bool:
        """Marked complete by boft-plugin, and not started again since (a matching or no pending marker)."""
        marker = self.complete_marker
        if marker.get("complete") is not True:
            return False
        return not self.pending_marker or self.pending_marker.get("nonce") == marker.get("nonce")

    @property
    def signed(self) -> bool:
        """Complete, and the completion marker verifies under this user's key over the checkpoint's files."""
        return self.complete and verify(self.complete_marker, self.path)

    def owned_by(self, lineage: str) -> bool:
        return self.ours and self.lineage == lineage


def step_of(path: str | os.PathLike) -> int:
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named checkpoint-N")
    return int(match.group(1))


def scan_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every ``checkpoint-N`` directory in ``output_dir``, oldest first (symlinks are not followed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        CheckpointInfo.read(root / name)
        for name in os.listdir(root)
        if CHECKPOINT_NAME.match(name) and (root / name).is_dir() and not (root / name).is_symlink()
    ]
    return sorted(found, key=lambda c: c.step)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether boft-plugin marked ``checkpoint`` complete (every rank finished writing it)."""
    return CheckpointInfo.read(Path(checkpoint)).complete


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that boft-plugin marked complete, or None."""
    complete = [c.path for c in scan_checkpoints(output_dir) if c.complete]
    return complete[-1] if complete else None


def is_checkpoint_writer(save_on_each_node: bool) -> bool:
    """Whether this rank writes markers and rotates (global rank 0, or each node's local rank 0)."""
    return local_rank() == 0 if save_on_each_node else rank() == 0


def begin_checkpoint(checkpoint: Path, lineage: str) -> str:
    """Before the Trainer writes ``checkpoint``: mark it started by ``lineage``; returns the marker's nonce.

    The pending marker goes in first, then an older completion marker is removed, so that no moment exists in which
    a half-rewritten directory carries a valid completion marker.
    """
    nonce = uuid.uuid4().hex
    checkpoint.mkdir(parents=True, exist_ok=True)
    pending = {
        "lineage": lineage,
        "nonce": nonce,
        "step": step_of(checkpoint),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
    }
    atomic_write_text(checkpoint / PENDING_MARKER, json.dumps(pending))
    with contextlib.suppress(FileNotFoundError):
        (checkpoint / COMPLETE_MARKER).unlink()
    return nonce


def complete_checkpoint(checkpoint: Path, lineage: str, nonce: str, world_size: int) -> None:
    """After every rank finished writing ``checkpoint``: the signed completion marker, then the pending one goes."""
    marker = {
        "complete": True,
        "lineage": lineage,
        "nonce": nonce,
        "step": step_of(checkpoint),
        "world_size": world_size,
        "time": time.time(),
    }
    marker["signature"] = sign(marker, checkpoint)
    atomic_write_text(checkpoint / COMPLETE_MARKER, json.dumps(marker))
    with contextlib.suppress(FileNotFoundError):
        (checkpoint / PENDING_MARKER).unlink()


def resign(checkpoint: Path) -> None:
    """Sign a complete checkpoint's marker again after boft-plugin added files to it (DeepSpeed's universal form)."""
    info = CheckpointInfo.read(checkpoint)
    if not info.complete:
        return
    marker = {k: v for k, v in info.complete_marker.items() if k != "signature"}
    marker["signature"] = sign(marker, checkpoint)
    atomic_write_text(checkpoint / COMPLETE_MARKER, json.dumps(marker))


def rotate(output_dir: str | os.PathLike, keep: int | None, lineage: str) -> list[Path]:
    """Remove ``lineage``'s own older checkpoints: complete ones beyond the newest ``keep``, and unfinished ones older
    than its newest complete one. Nothing any other run or tool wrote is touched. Returns what was removed."""
    owned = [c for c in scan_checkpoints(output_dir) if c.owned_by(lineage)]
    complete = [c for c in owned if c.complete]
    if not complete:
        return []
    newest = complete[-1].step
    kept = {c.step for c in (complete[-keep:] if keep else complete)}
    removed = []
    for checkpoint in owned:
        if checkpoint.step < newest and checkpoint.step not in kept:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            removed.append(checkpoint.path)
    return removed


def written_by_world_size(checkpoint: str | os.PathLike) -> int | None:
    """How many ranks wrote ``checkpoint`` (from its completion marker; None if it does not say)."""
    try:
        return int(_read(Path(checkpoint) / COMPLETE_MARKER)["world_size"])
    except (KeyError, ValueError, TypeError):
        return None


_WEIGHTS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DCP_DIR = "fsdp2_dcp"


def _deepspeed_tag(checkpoint: Path) -> str | None:
    try:
        tag = (checkpoint / "latest").read_text().strip()
    except OSError:
        return None
    return tag if tag and (checkpoint / tag).is_dir() else None


def trainer_missing(checkpoint: str | os.PathLike) -> list[str]:
    """What a checkpoint lacks by the Trainer's own standard (empty: resumable): the trainer state of its step, model
    weights, optimizer and scheduler states (DeepSpeed's or torch.distributed.checkpoint's in their formats)."""
    path = Path(checkpoint)
    missing = []
    state = _read(path / "trainer_state.json")
    if not state:
        missing.append("trainer_state.json (missing or not valid JSON)")
    elif state.get("global_step") != step_of(path):
        missing.append(f"trainer_state.json for step {step_of(path)} (it says {state.get('global_step')})")
    tag = _deepspeed_tag(path)
    dcp = (path / DCP_DIR / ".metadata").is_file()
    if not any((path / name).is_file() for name in _WEIGHTS) and not dcp:
        missing.append("model or adapter weights")
    if not (path / "optimizer.pt").is_file() and tag is None and not dcp:
        missing.append("optimizer state (optimizer.pt, a DeepSpeed tag directory or fsdp2_dcp/)")
    if not (path / "scheduler.pt").is_file() and tag is None:
        missing.append("scheduler.pt")
    return missing


def pickled_parts(checkpoint: str | os.PathLike) -> list[str]:
    """The parts of a checkpoint that resuming unpickles with code execution allowed.

    transformers reads the Trainer's own files (optimizer.pt, scheduler.pt, rng_state*.pth) with
    ``torch.load(weights_only=True)``; DeepSpeed's engine and ``ds_to_universal`` read their files with
    ``weights_only=False``; torch.distributed.checkpoint reads its ``.metadata`` with ``pickle``.
    """
    path = Path(checkpoint)
    parts = []
    tag = _deepspeed_tag(path)
    if tag is not None:
        parts.append(f"DeepSpeed's {tag}/ (torch.load with weights_only=False)")
    if (path / DCP_DIR / ".metadata").is_file():
        parts.append(f"{DCP_DIR}/.metadata (torch.distributed.checkpoint, a pickle)")
    return parts
