"""Stale lock files of torch's JIT-built extensions, named before a run waits on one for ever.

DeepSpeed loads a small C++ extension on every CPU run (``deepspeed_shm_comm``, built once into torch's extension
directory). Each load takes torch's ``FileBaton``, a ``lock`` file in the extension's build directory, for a moment
(a minute when it rebuilds). A process killed in that window leaves the file behind, and every later load then
waits for it without end and without a word (docs/design.md, engine facts). Nothing here removes a lock: a build
may really be running; the user is told which file it is and how old.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["STALE_AFTER_S", "stale_extension_locks", "warn_about_stale_extension_locks"]

STALE_AFTER_S = 600.0  # a build takes ~65 s on 2 cores; a lock this old has no live owner in practice


def _extension_roots() -> list[Path]:
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return [Path(explicit)]
    from torch.utils.cpp_extension import get_default_build_root

    return [Path(get_default_build_root())]


def stale_extension_locks(max_age_s: float = STALE_AFTER_S, now: float | None = None) -> list[tuple[Path, float]]:
    """``(lock file, age in seconds)`` of every extension build lock older than ``max_age_s``."""
    now = time.time() if now is None else now
    found = []
    for root in _extension_roots():
        # <root>/<name>/lock with $TORCH_EXTENSIONS_DIR, else <root>/py311_cpu/<name>/lock
        for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            try:
                age = now - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile
            if age > max_age_s:
                found.append((lock, age))
    return sorted(found)


def warn_about_stale_extension_locks(stream=None) -> list[tuple[Path, float]]:
    """Print one line per stale lock to ``stream`` (stderr); returns what was found."""
    found = stale_extension_locks()
    for lock, age in found:
        out = stream or sys.stderr
        out.write(  # one write per line (ranks of several nodes may share a log)
            f"boft-plugin: warning: {lock} is {age / 60:.0f} min old. A process killed while building or loading "
            f"that torch extension leaves it behind, and the next load (DeepSpeed's CPU runs load "
            f"deepspeed_shm_comm) waits for it for ever; remove it if no build is running.\n"
        )
        out.flush()
    return found
