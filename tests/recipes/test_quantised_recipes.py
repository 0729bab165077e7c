"""Recipes on a quantised base (TRL ModelConfig's bitsandbytes keys): the CLI in one process and under DDP, ZeRO-2,
ZeRO-3 and FSDP2, the exports verified in a fresh process, and the refusals that come before anything loads."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boft_plugin.errors import RecipeError
from boft_plugin.export.verify import verify_in_fresh_process
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.quantised import bitsandbytes_missing
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

missing = bitsandbytes_missing()
pytestmark = [pytest.mark.skipif(missing is not None, reason=missing or ""), pytest.mark.timeout(900)]

FOUR_BIT = {"load_in_4bit": True, "use_bnb_nested_quant": True, "bnb_4bit_quant_storage": "bfloat16"}
FOUR_BIT_SUMMARY = "4-bit nf4, double quantisation, storage bfloat16"


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


def accelerate(config: str, recipe: str, what: str):
    cli = ["-m", "boft_plugin", "sft", "--config", recipe]
    cmd = accelerate_cmd(str(REPO / "integrations" / "accelerate" / config), cli, num_processes=2)
    return launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check(what)


@pytest.mark.distributed
def test_ddp_torchrun_and_zero2_sft_on_an_8bit_base_train_alike(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    ddp_out, zero2_out = tmp_path / "ddp", tmp_path / "zero2"
    ddp_recipe = tiny_recipe("sft", ddp_out, data, export_merged=True, load_in_8bit=True)
    cmd = torchrun_cmd(["boft_plugin", "sft", "--config", write_recipe(tmp_path / "ddp.yaml", ddp_recipe)], module=True)
    launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check("DDP sft, 8-bit")
    zero2_recipe = tiny_recipe("sft", zero2_out, data, load_in_8bit=True)
    accelerate("zero2.yaml", write_recipe(tmp_path / "zero2.yaml", zero2_recipe), "ZeRO-2 sft, 8-bit")
    ddp, zero2 = summary(ddp_out), summary(zero2_out)
    assert ddp["world_size"] == zero2["world_size"] == 2 and (ddp["engine"], zero2["engine"]) == ("ddp", "zero2")
    assert ddp["base_quantisation"] == zero2["base_quantisation"] == "8-bit"
    assert ddp["eval_last"]["eval_loss"] < ddp["eval_first"]["eval_loss"]
    assert [s for s, _ in ddp["train_loss"]] == [s for s, _ in zero2["train_loss"]]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(ddp["train_loss"], zero2["train_loss"]))
    check_verified(ddp_out, zero2_out)


@pytest.mark.distributed
def test_zero3_partitions_a_4bit_base_trains_in_bf16_and_resumes_exactly(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "sft"
    mapping = tiny_recipe(
        "sft",
        out,
        data,
        export_merged=True,
        bf16=True,
        save_strategy="steps",
        save_steps=3,
        resume_from_checkpoint="auto",
        **FOUR_BIT,
    )
    recipe = write_recipe(tmp_path / "sft.yaml", mapping)
    result = accelerate("zero3.yaml", recipe, "ZeRO-3 sft, 4-bit")
    # DeepSpeed partitioned every packed weight (each rank logs its own count)
    assert len(re.findall(r"ZeRO-3: ([1-9]\d*) of \1 quantised layers partitioned", result.output)) == 2
    first = summary(out)
    assert first["engine"] == "zero3" and first["base_quantisation"] == FOUR_BIT_SUMMARY
    assert first["eval_last"]["eval_loss"] < first["eval_first"]["eval_loss"]
    check_verified(out)
    trained = load_file(out / "adapter_model.safetensors")

    shutil.rmtree(out / "checkpoint-6")  # as if the run had died after step 3: resume from checkpoint-3
    resumed = accelerate("zero3.yaml", recipe, "ZeRO-3 sft, 4-bit, resumed")
    assert f"resuming from {out / 'checkpoint-3'}" in resumed.output
    again = load_file(out / "adapter_model.safetensors")
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    assert summary(out)["train_loss"][-1] == first["train_loss"][-1]


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
    assert re.search(r"FSDP2: ([1-9]\d*) of \1 4-bit layers sharded", result.output)  # on each rank
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


@pytest.mark.parametrize(
    ("storage", "half_mode", "refused"),
    [
        ("float32", "bfloat16", True),  # DeepSpeed would cast the float32 bit patterns to bf16 numbers
        ("float16", "bfloat16", True),
        ("bfloat16", "float16", True),
        ("bfloat16", "bfloat16", False),  # already the dtype DeepSpeed casts to
        (None, "bfloat16", False),  # uint8 codes: DeepSpeed casts float parameters only
        ("float32", None, False),  # torch_autocast or fp32: nothing is cast
    ],
)
def test_packed_codes_deepspeed_half_mode_would_cast_are_refused(storage, half_mode, refused):
    """The check the parser runs when a DeepSpeed config enables its own bf16/fp16 (which the CPU cannot run:
    transformers refuses that mode without a GPU, so only this check is exercised here)."""
    from trl import ModelConfig

    from boft_plugin.recipes.quantisation import check_packed_codes_survive_half_mode

    model_args = ModelConfig(load_in_4bit=True, bnb_4bit_quant_storage=storage)
    if refused:
        with pytest.raises(RecipeError, match=f"'{storage}' packed 4-bit codes would be cast to {half_mode}"):
            check_packed_codes_survive_half_mode(model_args, half_mode)
    else:
        check_packed_codes_survive_half_mode(model_args, half_mode)
