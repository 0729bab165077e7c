"""Atomic writes of one file or of a set of files into a directory: no file is ever seen half-written.

Files are written into a hidden staging directory on the target's own filesystem, flushed to disk, given the modes
the user's umask asks for (some writers create 0600 files), then published in one of two ways:

- ``replace=True`` (a directory the caller owns whole, e.g. ``merged/``): the staging directory *becomes* the target
  in one step (``renameat2(RENAME_EXCHANGE)`` on Linux, then the previous version is removed). A kill at any moment
  leaves the old directory or the new one, never a mix. Staged as a sibling of the target; where the target is a mount
  point (another filesystem than its parent) the publish falls back to the entry-by-entry mode below.
- ``replace=False`` (a directory shared with other files, e.g. a run's ``output_dir``): staged *inside* the target
  (its own filesystem, even when it is a mount point or its parent is not writable); each staged entry replaces its
  namesake with one atomic rename (directories by exchange), configuration files last; the names in ``remove`` (files
  of an earlier layout that loaders would otherwise prefer) are removed in the same publish, after the new weights are
  in and before the configuration goes in; every other entry is left alone. A kill in between leaves complete old and
  new files side by side, never a truncated one.

Staging entries are named ``.boft-staging-<host>-<pid>-<id>``; :func:`remove_stale_staging` removes those of processes
on this host that are gone (a SIGKILL during an export leaves one behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "STAGING_PREFIX",
    "atomic_directory",
    "atomic_file",
    "atomic_write_text",
    "is_staging_name",
    "remove_stale_staging",
    "write_jsonl",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
STAGING_PREFIX = ".boft-staging-"
_WRITTEN_LAST = ("adapter_config.json", "config.json")  # readers look for these first: they go in last


def _staging_name(label: str) -> str:
    host = socket.gethostname().replace("-", "_")
    return f"{STAGING_PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{label}"


def is_staging_name(name: str) -> bool:
    return name.startswith(STAGING_PREFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(directory: str | os.PathLike) -> list[Path]:
    """Remove staging entries in ``directory`` left by processes of this host that no longer run; returns them.

    Entries of other hosts are kept (their processes cannot be seen from here), as is anything not named like ours.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    host = socket.gethostname().replace("-", "_")
    removed = []
    for entry in root.iterdir():
        if not is_staging_name(entry.name):
            continue
        parts = entry.name[len(STAGING_PREFIX) :].split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _pid_alive(pid):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _settle_tree(root: Path) -> None:
    """fsync every file and directory, and give them the modes a plain write would (files 0666, dirs 0777, minus the
    umask): every file of an export alike, whichever library wrote it."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(dirpath, 0o777 & ~mask)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace_entry(source: Path, target: Path) -> None:
    if not source.is_dir() or not target.exists() or not target.is_dir():
        os.replace(source, target)
        return
    if _exchange(source, target):
        shutil.rmtree(source)  # now holds the previous version
        return
    aside = target.with_name(_staging_name(f"old-{target.name}"))
    os.rename(target, aside)
    os.rename(source, target)
    shutil.rmtree(aside)


def _publish_entries(staging: Path, target: Path, remove: Iterable[str]) -> None:
    staged = sorted(os.listdir(staging), key=lambda n: (n in _WRITTEN_LAST, n))
    first = [n for n in staged if n not in _WRITTEN_LAST]
    for name in first:
        _replace_entry(staging / name, target / name)
    for name in sorted(set(remove) - set(staged)):
        if (target / name).exists() or (target / name).is_symlink():
            _remove(target / name)
    for name in staged[len(first) :]:
        _replace_entry(staging / name, target / name)
    _fsync_dir(target)


def _publish_whole(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # now holds the previous version
    else:  # no RENAME_EXCHANGE here (e.g. NFS): a short moment without the target, the old one kept aside until then
        aside = target.with_name(_staging_name(f"old-{target.name}"))
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
    _fsync_dir(target.parent)


def _same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = False, remove: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit its entries are published into ``target`` atomically.

    Args:
        replace: the staging directory replaces ``target`` whole (see the module docstring).
        remove: with ``replace=False``, names in ``target`` to remove in the same publish unless restaged.

    On an exception the staging directory is removed and ``target`` is left exactly as it was.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    whole = not target.exists() or (replace and _same_filesystem(target, target.parent))
    staging = (target.parent if whole else target) / _staging_name(target.name)
    staging.mkdir()
    try:
        yield staging
        _settle_tree(staging)
        if whole:
            _publish_whole(staging, target)
        else:
            _publish_entries(staging, target, remove)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s directory to write one file to; on normal exit it is flushed and
    renamed over ``target``. On an exception the temporary file is removed and ``target`` is left as it was."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / _staging_name(target.name)
    try:
        yield staging
        os.chmod(staging, 0o666 & ~_umask())
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_file`)."""
    with atomic_file(target) as staging:
        staging.write_text(text)
    return Path(target)


def write_jsonl(rows: list[dict], target: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON lines to ``target`` atomically, creating its directory; returns the path."""
    import json

    Path(target).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(target, "".join(json.dumps(row) + "\n" for row in rows))
