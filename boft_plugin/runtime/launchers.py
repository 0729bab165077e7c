"""Start multi-process runs with the existing engines' launchers (torch.distributed.run, accelerate, deepspeed).

Nothing here spawns ranks itself: it builds the launcher's command line, pins the environment that makes CPU
runs reproducible (gloo on 127.0.0.1, one OpenMP thread per rank, a fixed C/C++ compiler so that DeepSpeed's
cached CPU extension is not rebuilt), runs it with a timeout, and kills the whole process tree on timeout.
Used by the main job, the tests and the examples.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

__all__ = [
    "ATTEMPTS_ENV",
    "LaunchResult",
    "LaunchTimeoutWarning",
    "accelerate_cmd",
    "cpu_env",
    "free_port",
    "launch",
    "torchrun_cmd",
]


ATTEMPTS_ENV = "BOFT_PLUGIN_LAUNCH_ATTEMPTS"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(extra: dict[str, str] | None = None, threads_per_rank: int = 1) -> dict[str, str]:
    """Environment for CPU ranks: loopback only, no hub, pinned compilers, bounded threads."""
    env = dict(os.environ)
    env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME", "lo"),
            "OMP_NUM_THREADS": str(threads_per_rank),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            # DeepSpeed rebuilds its cached CPU comm extension whenever CC/CXX change; keep them fixed.
            "CC": "gcc",
            "CXX": "g++",
            "PYTHONUNBUFFERED": "1",
            # a worker stopped on timeout (SIGABRT) or crashing prints every thread's Python stack
            "PYTHONFAULTHANDLER": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


def torchrun_cmd(
    script_and_args: Sequence[str],
    nproc_per_node: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    master_port: int | None = None,
    module: bool = False,
) -> list[str]:
    """``python -m torch.distributed.run ...`` for one node of a (possibly multi-node) job on 127.0.0.1."""
    port = master_port or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1"]
    else:
        cmd += ["--standalone"] if master_port is None else ["--master_addr=127.0.0.1"]
    if nnodes > 1 or master_port is not None:
        cmd += [f"--master_port={port}"]
    if module:
        cmd.append("-m")
    return cmd + list(script_and_args)


def accelerate_cmd(
    config_file: str,
    script_and_args: Sequence[str],
    num_processes: int | None = None,
    main_process_port: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``accelerate launch --config_file ...`` (``python -m accelerate.commands.launch``)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["--main_process_port", str(main_process_port or free_port()), *extra]
    return cmd + list(script_and_args)


@dataclass
class LaunchResult:
    returncode: int
    output: str
    timed_out: bool = False

    def check(self, what: str = "launch") -> LaunchResult:
        if self.returncode != 0:
            tail = self.output[-6000:]
            reason = "timed out" if self.timed_out else f"exited with {self.returncode}"
            raise RuntimeError(f"{what} {reason}; last output:\n{tail}")
        return self


def launch(
    cmds: Sequence[Sequence[str]] | Sequence[str],
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    echo: bool = False,
    attempts: int | None = None,
) -> LaunchResult:
    """Run one launcher command, or several concurrently (e.g. the launchers of two "nodes").

    Output of all commands is returned concatenated (and streamed to stdout when ``echo``). On timeout, or when
    the caller is interrupted, every process the commands started is stopped: the workers first get SIGABRT so
    that Python's fault handler (``PYTHONFAULTHANDLER``, set by ``cpu_env``) prints where each thread was, then
    the whole tree gets SIGKILL. Killing the launcher's process group is not enough: torch.distributed.run and
    DeepSpeed start each worker in a session of its own, and an orphaned worker holding the output pipe would
    keep this call waiting for ever.

    ``attempts`` (default ``$BOFT_PLUGIN_LAUNCH_ATTEMPTS``, else 1): how many times a command that *timed out* is
    started again from scratch; a command that exits, with any code, is never repeated. Each timed-out attempt is
    reported as a :class:`LaunchTimeoutWarning` carrying the workers' stacks. The test suite allows 2, so that one
    rare hang of a CPU gloo run costs time but still shows where it hung.
    """
    if attempts is None:
        attempts = int(os.environ.get(ATTEMPTS_ENV, "1"))
    for attempt in range(1, max(1, attempts) + 1):
        result = _run_once(cmds, timeout, env, cwd, echo)
        if not result.timed_out or attempt >= attempts:
            return result
        warnings.warn(
            f"launch timed out after {timeout:.0f} s (attempt {attempt} of {attempts}), starting it again; "
            f"where the workers were:\n{result.output[-8000:]}",
            LaunchTimeoutWarning,
            stacklevel=2,
        )
    raise AssertionError("unreachable")


class LaunchTimeoutWarning(RuntimeWarning):
    """A launched command timed out and was started again (``launch(..., attempts > 1)``)."""


def _run_once(cmds, timeout: float, env: dict[str, str] | None, cwd: str | None, echo: bool) -> LaunchResult:
    many = bool(cmds) and not isinstance(cmds[0], str)
    commands = [list(c) for c in cmds] if many else [list(cmds)]  # type: ignore[arg-type]
    env = env or cpu_env()
    procs = [
        subprocess.Popen(
            c,
            env=env,
            cwd=cwd,
            stdout=None if echo else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for c in commands
    ]
    outputs, timed_out, code = [], False, 0
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop_trees(procs, dump_stacks=True)
                out = _drain(proc)
            outputs.append(out or "")
            code = code or proc.returncode
    except BaseException:
        _stop_trees(procs, dump_stacks=False)
        raise
    return LaunchResult(returncode=code if not timed_out else 124, output="\n".join(outputs), timed_out=timed_out)


def _drain(proc: subprocess.Popen, grace: float = 30.0) -> str:
    """What a stopped command printed; bounded, in case something outside its tree still holds the pipe."""
    try:
        out, _ = proc.communicate(timeout=grace)
        return out or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        return "(output not complete: a process outside the launcher's tree kept the pipe open)"


def _process_trees(procs: Sequence[subprocess.Popen]) -> list[psutil.Process]:
    """Every live process the commands started, launchers first, then their descendants."""
    found: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(proc.pid)
            found += [top, *top.children(recursive=True)]
    return found


def _stop_trees(procs: Sequence[subprocess.Popen], dump_stacks: bool, stack_wait: float = 5.0) -> None:
    tree = _process_trees(procs)
    if dump_stacks:
        # the workers: everything below the launchers, or the command itself when it started nothing
        launchers = {proc.pid for proc in procs}
        workers = [p for p in tree if p.pid not in launchers] or tree
        for process in workers:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGABRT)
        psutil.wait_procs(workers, timeout=stack_wait)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    for proc in procs:
        _kill_group(proc)
    psutil.wait_procs(tree, timeout=stack_wait)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
