"""Recipes on a quantised base (TRL ModelConfig's bitsandbytes keys): the CLI in one process and under DDP, the
exports verified in a fresh process, and the refusals that come before anything loads."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from boft_plugin.errors import RecipeError
from boft_plugin.export.verify import verify_in_fresh_process
from boft_plugin.runtime.launchers import cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.quantised import bitsandbytes_missing
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

missing = bitsandbytes_missing()
pytestmark = [pytest.mark.skipif(missing is not None, reason=missing or ""), pytest.mark.timeout(900)]

FOUR_BIT = {"load_in_4bit": True, "use_bnb_nested_quant": True, "bnb_4bit_quant_storage": "bfloat16"}


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "boft_run_summary.json").read_text())


def check_verified(*output_dirs: Path) -> None:
    for report in verify_in_fresh_process(*output_dirs, timeout=300):
        assert report["ok"], report
        assert report["quantised_base"] == "bitsandbytes"
        # stock PEFT's maths on the same quantised base (bf16-level where bitsandbytes' CPU kernel computes in bf16)
        limit = 2e-2 if report.get("quantised_kernel_dtype") == "torch.bfloat16" else 1e-5
        assert report["oracle_rel_err"] < limit
        if "merged_rel_err" in report:  # full precision, against the adapter on the full-precision base
            assert report["merged_against"] == "boft-plugin on the full-precision base"
            assert report["merged_rel_err"] < 1e-5


def test_cli_sft_then_dpo_on_a_4bit_base(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    sft = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", sft_out, data, export_merged=True, **FOUR_BIT))
    dpo = write_recipe(tmp_path / "dpo.yaml", tiny_recipe("dpo", dpo_out, data, init_adapter=str(sft_out), **FOUR_BIT))
    console_script = Path(sys.executable).with_name("boft-plugin")
    for task, recipe in (("sft", sft), ("dpo", dpo)):
        launch([str(console_script), task, "--config", recipe], timeout=300, env=cpu_env(), cwd=str(REPO)).check(task)

    sft_summary, dpo_summary = summary(sft_out), summary(dpo_out)
    assert sft_summary["base_quantisation"] == "4-bit nf4, double quantisation, storage bfloat16"
    assert sft_summary["eval_last"]["eval_loss"] < sft_summary["eval_first"]["eval_loss"]
    margins = dpo_summary["eval_margins"]
    assert margins[0][1] == 0.0 and margins[-1][1] > 0.0
    merged_config = json.loads((sft_out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "float32"
    check_verified(sft_out, dpo_out)


@pytest.mark.distributed
def test_ddp_torchrun_sft_on_an_8bit_base(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "sft"
    recipe = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", out, data, export_merged=True, load_in_8bit=True))
    cmd = torchrun_cmd(["boft_plugin", "sft", "--config", recipe], nproc_per_node=2, module=True)
    launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check("DDP sft, 8-bit")
    result = summary(out)
    assert result["world_size"] == 2 and result["base_quantisation"] == "8-bit"
    assert result["eval_last"]["eval_loss"] < result["eval_first"]["eval_loss"]
    check_verified(out)


@pytest.mark.distributed
def test_fsdp2_torchrun_sft_shards_a_4bit_base(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "sft"
    recipe = write_recipe(
        tmp_path / "sft.yaml", tiny_recipe("sft", out, data, export_merged=True, fsdp2_pre_shard=True, **FOUR_BIT)
    )
    cmd = torchrun_cmd(["boft_plugin", "sft", "--config", recipe], nproc_per_node=2, module=True)
    result = launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO))
    result.check("FSDP2 sft, 4-bit")
    assert re.search(r"FSDP2: (\d+) of \1 4-bit layers sharded", result.output)  # on each rank
    summary_ = summary(out)
    assert summary_["world_size"] == 2 and summary_["engine"] == "fsdp2"
    assert summary_["base_quantisation"] == "4-bit nf4, double quantisation, storage bfloat16"
    assert summary_["eval_last"]["eval_loss"] < summary_["eval_first"]["eval_loss"]
    check_verified(out)


def test_adapters_train_in_float32_on_a_4bit_base(tmp_path):
    import bitsandbytes as bnb
    import torch

    from boft_plugin.recipes import parse_recipe, run

    data = write_tiny_data(tmp_path / "data")
    recipe = parse_recipe("sft", [], config=tiny_recipe("sft", tmp_path / "out", data, max_steps=2, **FOUR_BIT))
    model = run(recipe).trainer.model
    adapters = {name: p for name, p in model.named_parameters() if "boft_" in name}
    assert adapters and {p.dtype for p in adapters.values()} == {torch.float32}  # TRL had cast them to bf16
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj) is bnb.nn.Linear4bit and q_proj.weight.quant_storage == torch.bfloat16


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"bnb_4bit_quant_type": "fp4"}, "'bnb_4bit_quant_type' only apply to a 4-bit base: add 'load_in_4bit: true'"),
        ({"load_in_8bit": True, "use_bnb_nested_quant": True}, "apply to 4-bit bases, not 8-bit"),
        ({"load_in_4bit": True, "fsdp2_pre_shard": True}, "'bnb_4bit_quant_storage': 'uint8' codes are not sharded"),
        ({"load_in_8bit": True, "fsdp2_pre_shard": True}, "FSDP2 shards 4-bit bases only"),
        ({**FOUR_BIT, "_env": {"ACCELERATE_USE_FSDP": "true"}}, "this launch is accelerate's FSDP plugin"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "int3"}, "recipe quantisation keys cannot be used"),
        ({"load_in_4bit": True, "_no_bitsandbytes": True}, "needs bitsandbytes, which is not installed: pip install"),
    ],
)
def test_quantisation_keys_that_cannot_run_are_refused_before_anything_loads(tmp_path, monkeypatch, keys, message):
    from boft_plugin.recipes import parse_recipe, prepare
    from boft_plugin.recipes import quantisation as quantisation_module

    keys = dict(keys)
    for name, value in keys.pop("_env", {}).items():
        monkeypatch.setenv(name, value)
    if keys.pop("_no_bitsandbytes", False):
        real = quantisation_module.importlib.util.find_spec
        monkeypatch.setattr(
            quantisation_module.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
        )
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(parse_recipe("sft", [], config=tiny_recipe("sft", out, data, **keys)))
    assert not out.exists()
