"""The main job on the real pretrained model (SmolLM2-135M-Instruct from the package registry), shortened: the GGUF
conversion (cached after the first run), SFT under FSDP2 then DPO under DDP on 2 gloo ranks, every export
(adapter, single-factor adapter, merged model) reloaded in a fresh process, the base model's answers. A few steps
only (`--smoke`): the pipeline on the real model cannot rot; `make demo` runs the full job and its learning checks.
"""

from __future__ import annotations

import json
import sys

import pytest

from boft_plugin.runtime.launchers import cpu_env, launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1200)]


def test_main_job_pipeline_on_the_real_model(tmp_path):
    workdir = tmp_path / "job"
    cmd = [
        sys.executable,
        "-m",
        "boft_plugin.demo.main_job",
        "--workdir",
        str(workdir),
        "--smoke",
        "--sft-steps",
        "2",
        "--dpo-steps",
        "1",
        "--prompts",
        "1",
    ]
    result = launch(cmd, timeout=1140, env=cpu_env())
    result.check("main job (smoke)")
    assert "Checks: all passed" in result.output
    for name in (
        "sft.yaml",
        "dpo.yaml",
        "loss_curves.png",
        "summary.txt",
        "sft/adapter_model.safetensors",
        "sft/single_factor/adapter_model.safetensors",
        "dpo/adapter_model.safetensors",
        "dpo/merged/model.safetensors",
    ):
        assert (workdir / name).is_file(), name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["failures"] == [] and len(summary["reports"]) == 2
    for report in summary["reports"]:
        assert report["n_butterfly_factor"] == 2 and report["oracle_rel_err"] < 1e-5
        assert report["single_factor"]["as_installed"]["loads"]  # stock PEFT exactly as installed
        assert report["single_factor"]["as_installed"]["rel_err"] < 1e-4
    sft = json.loads((workdir / "sft" / "boft_run_summary.json").read_text())
    assert sft["world_size"] == 2 and sft["global_step"] == 2
    assert len(summary["answers"]["base"]) == 1 and summary["answers"]["base"][0]
