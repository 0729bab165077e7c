"""The command line in one process: SFT with the console script, DPO from its adapter through accelerate's
single-process config, then both exports reloaded with stock PEFT in a fresh process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from boft_plugin.export.verify import verify_in_fresh_process
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

pytestmark = pytest.mark.timeout(600)


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "boft_run_summary.json").read_text())


def test_cli_sft_then_dpo_single_process(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    sft_yaml = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", sft_out, data, export_merged=True))
    dpo_yaml = write_recipe(
        tmp_path / "dpo.yaml", tiny_recipe("dpo", dpo_out, data, init_adapter=str(sft_out), export_merged=True)
    )

    console_script = Path(sys.executable).with_name("boft-plugin")
    launch([str(console_script), "sft", "--config", sft_yaml], timeout=300, env=cpu_env(), cwd=str(REPO)).check("sft")
    cmd = accelerate_cmd(
        str(REPO / "integrations/accelerate/single.yaml"), ["-m", "boft_plugin", "dpo", "--config", dpo_yaml]
    )
    launch(cmd, timeout=300, env=cpu_env(), cwd=str(REPO)).check("dpo (accelerate, single.yaml)")

    sft, dpo = summary(sft_out), summary(dpo_out)
    assert sft["world_size"] == dpo["world_size"] == 1
    assert sft["eval_last"]["eval_loss"] < sft["eval_first"]["eval_loss"]
    assert dpo["eval_margins"][0][1] == 0.0 and dpo["eval_margins"][-1][1] > 0.0  # the margin rises

    for report in verify_in_fresh_process(sft_out, dpo_out, timeout=300):
        assert report["ok"], report
        assert report["n_butterfly_factor"] == 2 and report["stock_layer"].startswith("peft.tuners.boft")
        assert report["oracle_rel_err"] < 1e-5 and report["merged_rel_err"] < 1e-5


def test_cli_error_exit_code_in_a_fresh_process(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data, warmup_stepz=3))
    result = launch([sys.executable, "-m", "boft_plugin", "sft", "--config", recipe], timeout=120, env=cpu_env())
    assert result.returncode == 2
    assert "unknown recipe key(s)" in result.output and "'warmup_stepz'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
