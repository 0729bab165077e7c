"""Atomic writes of one file or of a set of files into a directory: no file is ever seen half-written.

Files are written into a hidden temporary sibling directory and flushed to disk first. Then:

- a target that does not exist yet appears with one rename (all files at once);
- into an existing target, each written entry replaces its namesake with one atomic rename (directories with
  ``renameat2(RENAME_EXCHANGE)`` on Linux), configuration files last, and anything else already in the target
  (a Trainer's checkpoints, logs, a tokenizer) is left alone. A crash in between leaves complete old and new
  files side by side, never a truncated one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


_WRITTEN_LAST = ("adapter_config.json", "config.json")  # readers look for these first: they go in last


def _replace_entry(source: Path, target: Path) -> None:
    if not source.is_dir() or not target.exists():
        os.replace(source, target)
        return
    if _exchange(source, target):
        shutil.rmtree(source)  # now holds the previous version
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    os.rename(source, target)
    shutil.rmtree(aside)


def _publish(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    for name in sorted(os.listdir(staging), key=lambda n: (n in _WRITTEN_LAST, n)):
        _replace_entry(staging / name, target / name)
    _fsync_dir(target)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit its entries are published into ``target`` atomically.

    On an exception the staging directory is removed and ``target`` is left exactly as it was.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        _publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write one file to; on normal exit it is flushed and renamed over ``target``.

    On an exception the temporary file is removed and ``target`` is left exactly as it was.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            staging.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_file`)."""
    with atomic_file(target) as staging:
        staging.write_text(text)
    return Path(target)
