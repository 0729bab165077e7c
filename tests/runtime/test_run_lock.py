"""One run per output directory (boft_plugin.runtime.run_lock): a live owner refuses a second run, a dead one on this
host is taken over, one on another host is never guessed at."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from boft_plugin.cli import main as cli_main
from boft_plugin.errors import RunLockError
from boft_plugin.runtime.run_lock import LOCK_NAME, RunLock, read_owner
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data


def test_a_live_owner_refuses_and_releasing_removes_only_its_own_lock(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = RunLock(tmp_path).acquire()
    first.release()  # released twice: the second run's lock stays
    assert read_owner(tmp_path / LOCK_NAME).run_id == second.run_id


def _forged(tmp_path, host: str, pid: int, started: float) -> None:
    owner = {"host": host, "pid": pid, "started": started, "run_id": "someone", "command": "boft-plugin sft"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(owner))


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _forged(tmp_path, socket.gethostname(), gone.pid, time.time())
    lock = RunLock(tmp_path).acquire()
    assert read_owner(tmp_path / LOCK_NAME).run_id == lock.run_id
    lock.release()
    # a live pid whose process started at another time is a reused pid: the owner is gone too
    _forged(tmp_path, socket.gethostname(), os.getpid(), psutil.Process().create_time() - 3600)
    RunLock(tmp_path).acquire().release()


def test_an_owner_on_another_host_is_never_taken_over(tmp_path):
    _forged(tmp_path, "some-other-node", 1, time.time())
    with pytest.raises(RunLockError, match="on another host: boft-plugin cannot tell whether it still runs"):
        RunLock(tmp_path).acquire()
    assert read_owner(tmp_path / LOCK_NAME).run_id == "someone"


def test_the_cli_refuses_an_output_dir_in_use_and_writes_nothing(tmp_path, capsys):
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "out"
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", out, data, max_steps=2, eval_strategy="no"))
    with RunLock(out):
        before = sorted(os.listdir(out))
        assert cli_main(["sft", "--config", config]) == 2
        assert sorted(os.listdir(out)) == before == [LOCK_NAME]
    assert "is in use by another run" in capsys.readouterr().err
