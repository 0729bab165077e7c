"""The main job end to end (python -m boft_plugin.main_job): SFT then DPO on 2 gloo ranks, fresh-process reloads.

About 1.5 minutes on 2 idle cores; marked slow but part of the default test command.
"""

from __future__ import annotations

import json
import sys

import pytest

from boft_plugin.launchers import cpu_env, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]


def test_main_job_passes(tmp_path):
    workdir = tmp_path / "job"
    result = run([sys.executable, "-m", "boft_plugin.main_job", "--workdir", str(workdir)], timeout=840, env=cpu_env())
    result.check("main job")
    assert "Checks: all passed" in result.output
    for name in (
        "sft.yaml",
        "dpo.yaml",
        "loss_curves.png",
        "summary.txt",
        "sft/adapter_model.safetensors",
        "dpo/adapter_model.safetensors",
        "sft/merged/model.safetensors",
        "dpo/merged/model.safetensors",
    ):
        assert (workdir / name).is_file(), name
    assert (workdir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = json.loads((workdir / "summary.json").read_text())
    assert reports["failures"] == [] and len(reports["reports"]) == 2
    assert all(r["n_butterfly_factor"] == 2 and r["oracle_rel_err"] < 1e-5 for r in reports["reports"])
    dpo = json.loads((workdir / "dpo" / "boft_run_summary.json").read_text())
    assert dpo["world_size"] == 2 and dpo["eval_margins"][-1][1] > dpo["eval_margins"][0][1]
