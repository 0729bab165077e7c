"""End a distributed worker process without the interpreter's teardown, once its work is done.

With torch 2.13, ``destroy_process_group()`` after a ``DistributedDataParallel`` backward does not free the gloo
process group: its ``pt_gloo_runloop`` threads (and gloo's ``gloo_tcp_loop``) stay alive until the interpreter
finalises (checked: ``tests/runtime/test_process_exit.py``). Torn down then, they sometimes abort a rank that
finished and wrote everything ("terminate called without an active exception", SIGABRT: seen once, a 240-step DDP
SFT in a fresh-clone test run), and the launcher reports a failed job; the rare glibc heap abort seen after a run's
export may be the same teardown. Such a process runs its ``atexit`` handlers (trackers, logging, temporary files),
flushes, and leaves with ``os._exit`` so that nothing is torn down under live C++ threads.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn

__all__ = ["exit_after_distributed_run", "launched_distributed", "launched_world_size"]


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when unset or not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_distributed() -> bool:
    """True in a rank started by torch.distributed.run / accelerate / DeepSpeed with more than one process."""
    return launched_world_size() > 1


def exit_after_distributed_run(code: int) -> NoReturn:
    """Destroy the process group if it is still up, run the ``atexit`` handlers, flush, then ``os._exit(code)``.

    Call it once this rank's last collective is done (no barrier here: a rank leaving on an error must not wait
    for the others)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what a normal exit would run: logging.shutdown, trackers, tempfile cleanup
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken pipe: nothing more can be said anyway
            stream.flush()
    os._exit(code)
