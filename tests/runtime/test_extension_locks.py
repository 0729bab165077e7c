"""A stale torch-extension build lock is named before a run can wait on it for ever
(boft_plugin.runtime.extension_locks)."""

from __future__ import annotations

import os
import sys
import time

from boft_plugin.runtime.extension_locks import STALE_AFTER_S, stale_extension_locks
from boft_plugin.runtime.launchers import cpu_env, launch


def _lock(root, name: str, age_s: float):
    path = root / name / "lock"
    path.parent.mkdir(parents=True)
    path.touch()
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def test_only_old_locks_are_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = _lock(tmp_path, "deepspeed_shm_comm", STALE_AFTER_S + 60)
    _lock(tmp_path, "fused_adam", 5)  # a build that may be running now
    assert [path for path, _ in stale_extension_locks()] == [old]
    assert stale_extension_locks(max_age_s=1) and len(stale_extension_locks(max_age_s=1)) == 2


def test_the_cli_names_a_stale_lock_before_it_starts(tmp_path):
    old = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    env = cpu_env({"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    result = launch([sys.executable, "-m", "boft_plugin", "sft", "--config", str(tmp_path / "missing.yaml")], 120, env)
    assert result.returncode == 2, result.output[-2000:]
    warning = next(line for line in result.output.splitlines() if "boft-plugin: warning:" in line)
    assert str(old) in warning and "60 min old" in warning
    assert result.output.index(str(old)) < result.output.index("error")
