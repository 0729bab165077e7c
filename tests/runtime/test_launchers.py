"""A hung distributed run ends at its timeout, with the workers' stacks, and leaves no process behind.

torch.distributed.run starts each worker in a session of its own, so killing the launcher's process group
leaves the workers running with the output pipe open; the launcher helper must stop the whole tree.
"""

from __future__ import annotations

import re
import sys
import textwrap
import time

import psutil
import pytest

from boft_plugin.runtime.launchers import LaunchTimeoutWarning, launch, torchrun_cmd

HUNG_WORKER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    # a grandchild in a session of its own that also holds the output pipe
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    sys.stdout.write(f"worker {os.environ['RANK']} pid {os.getpid()} waiting\\n")
    def wait_for_a_peer_that_never_comes():
        time.sleep(600)
    wait_for_a_peer_that_never_comes()
    """
)


def _pids_of(output: str) -> list[int]:
    # searched in the whole output, not line by line: the two workers share the pipe, and a line of one can run
    # into the other's (under PYTHONUNBUFFERED a print's text and newline are separate writes; seen in CI)
    return [int(pid) for pid in re.findall(r"worker \d+ pid (\d+) waiting", output)]


def test_worker_lines_that_ran_into_each_other_are_still_found():
    # what CI printed once: rank 1's text, then rank 0's, then both newlines
    assert _pids_of("worker 1 pid 24261 waitingworker 0 pid 24260 waiting\n\n") == [24261, 24260]


def test_hung_torchrun_workers_are_stopped_with_their_stacks(tmp_path):
    script = tmp_path / "hung_worker.py"
    script.write_text(HUNG_WORKER)
    start = time.monotonic()
    result = launch(torchrun_cmd([str(script)], nproc_per_node=2), timeout=20, attempts=1)
    elapsed = time.monotonic() - start

    assert result.timed_out and result.returncode == 124
    assert elapsed < 20 + 45, f"launch() returned {elapsed:.0f} s after start, not soon after its 20 s timeout"
    pids = _pids_of(result.output)
    assert len(pids) == 2, result.output[-3000:]
    # each worker printed where it was stuck (PYTHONFAULTHANDLER from cpu_env, SIGABRT before the kill)
    assert result.output.count("wait_for_a_peer_that_never_comes") >= 2, result.output[-3000:]
    time.sleep(1)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    with pytest.raises(RuntimeError, match="timed out"):
        result.check("hung run")


def test_a_finished_run_keeps_its_output_and_exit_code():
    result = launch([sys.executable, "-c", "print('done'); raise SystemExit(3)"], timeout=60)
    assert not result.timed_out and result.returncode == 3 and "done" in result.output


FIRST_ATTEMPT_HANGS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    marker = Path(sys.argv[1])
    with marker.open("a") as f:
        f.write("attempt\\n")
    if len(marker.read_text().splitlines()) == 1:
        time.sleep(600)
    print("finished")
    """
)


def test_a_timed_out_launch_is_started_again_and_reported(tmp_path):
    script, marker = tmp_path / "flaky.py", tmp_path / "attempts.txt"
    script.write_text(FIRST_ATTEMPT_HANGS)
    with pytest.warns(LaunchTimeoutWarning, match="attempt 1 of 2"):
        result = launch([sys.executable, str(script), str(marker)], timeout=8, attempts=2)
    assert result.returncode == 0 and "finished" in result.output
    assert marker.read_text().splitlines() == ["attempt", "attempt"]


def test_a_failed_launch_is_not_repeated(tmp_path):
    marker = tmp_path / "attempts.txt"
    code = f"open({str(marker)!r}, 'a').write('attempt' + chr(10)); raise SystemExit(2)"
    result = launch([sys.executable, "-c", code], timeout=60, attempts=3)
    assert result.returncode == 2 and marker.read_text().splitlines() == ["attempt"]
