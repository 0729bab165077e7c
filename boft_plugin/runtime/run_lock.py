"""An exclusive lock on a run's output directory, so that two runs never mark, rotate or export over each other.

The lock is a file, ``<output_dir>/.boft-plugin.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local and
network filesystems) and holding who owns it: host, pid, the process's start time, a run id and the command line.
A lock whose owner is gone is *stale*: on the same host that is decided for certain (the pid is not alive, or is a
different process with the same pid); a lock held from another host is never taken over automatically, since this
host cannot see that host's processes. The message names the owner and how to remove the file when that run is
known to be gone.

The run id doubles as a probe of the filesystem: every rank reads the lock back (:func:`check_every_rank_sees`), and
a rank that cannot see rank 0's lock is on a node whose ``output_dir`` is another directory (a node-local disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ..errors import RunLockError

__all__ = ["LOCK_NAME", "LockOwner", "RunLock", "read_owner"]

LOCK_NAME = ".boft-plugin.lock"


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run lock."""

    host: str
    pid: int
    started: float  # the owning process's start time (psutil), to tell a reused pid from the owner
    run_id: str
    command: str

    def is_gone(self) -> bool | None:
        """True when the owner certainly exited, False when it runs, None when it is on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.started) > 1.0  # the pid now belongs to another process
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {when} ({self.command})"


def read_owner(lock_file: Path) -> LockOwner | None:
    """The owner recorded in ``lock_file`` (None when it is missing or unreadable)."""
    try:
        data = json.loads(lock_file.read_text())
        return LockOwner(**{k: data[k] for k in LockOwner.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """``RunLock(output_dir).acquire()`` ... ``release()``; also a context manager.

    Only the process that acquired the lock removes it, and only while the file still names its run id.
    """

    def __init__(self, directory: str | os.PathLike, run_id: str | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.run_id = run_id or uuid.uuid4().hex
        self.held = False

    def _owner(self) -> LockOwner:
        me = psutil.Process()
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:6]))
        return LockOwner(socket.gethostname(), os.getpid(), me.create_time(), self.run_id, command[:200])

    def acquire(self) -> RunLock:
        """Take the lock (creating ``directory`` if needed); raise :class:`RunLockError` if another run holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(asdict(self._owner()))
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(self.path)
                if owner is not None and owner.is_gone() is not True:
                    where = (
                        "on another host: boft-plugin cannot tell whether it still runs"
                        if owner.is_gone() is None
                        else "still running"
                    )
                    raise RunLockError(
                        f"output_dir {self.directory} is in use by another run ({owner.describe()}, {where}); two "
                        "runs in one output_dir would mark, rotate and export over each other. Wait for it, choose "
                        f"another output_dir, or remove {self.path} if that run is gone"
                    ) from None
                self._take_over_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return self
        raise RunLockError(f"{self.path}: could not be taken (another run keeps re-creating it)")

    def _take_over_stale(self) -> None:
        """Move a stale (or unreadable) lock aside; if two processes race, one rename wins, the other finds none."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)
            aside.unlink()

    def release(self) -> None:
        """Remove the lock if this process holds it and the file still names this run."""
        if not self.held:
            return
        self.held = False
        owner = read_owner(self.path)
        if owner is not None and owner.run_id == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_every_rank_sees(directory: str | os.PathLike, run_id: str) -> list[tuple[int, str]]:
    """Collective: ``(rank, host)`` of every rank that does NOT see rank 0's lock (with ``run_id``) in ``directory``.

    Empty when ``directory`` is the same directory on every node (a shared filesystem).
    """
    from .ranks import gather_objects

    owner = read_owner(Path(directory) / LOCK_NAME)
    seen = owner is not None and owner.run_id == run_id
    reports = gather_objects((seen, socket.gethostname()))
    return [(rank, host) for rank, (ok, host) in enumerate(reports) if not ok]
