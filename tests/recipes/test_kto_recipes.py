"""KTO recipes (`boft-plugin kto`): TRL's KTOTrainer with a BOFT adapter, through the same strict recipe machinery
as SFT and DPO. The reference is the adapter-disabled base (a fresh adapter) or an exact copy of the init adapter
(TRL's ``ref``), never a second model. In one process and under ZeRO-3 the same global batch gives the same losses
on this task (KTO's KL baseline is estimated per micro-batch, so not exactly in general: docs/trl.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from boft_plugin.errors import RecipeError
from boft_plugin.runtime.atomic import write_jsonl
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.recipes import check_verified, tiny_recipe, write_recipe, write_tiny_data
from boft_plugin.testing.recipes import read_summary as summary

pytestmark = pytest.mark.timeout(900)


@pytest.mark.distributed
def test_cli_kto_continues_an_sft_adapter_alike_in_one_process_and_under_zero3(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    sft_out = tmp_path / "sft"
    sft = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", sft_out, data))
    console_script = str(Path(sys.executable).with_name("boft-plugin"))
    launch([console_script, "sft", "--config", sft], timeout=300, env=cpu_env(), cwd=str(REPO)).check("sft")

    single_out, zero3_out = tmp_path / "kto_single", tmp_path / "kto_zero3"
    common = dict(init_adapter=str(sft_out), export_merged=True)
    single = write_recipe(  # the same global batch (8) as 2 ranks x 4
        tmp_path / "single.yaml", tiny_recipe("kto", single_out, data, per_device_train_batch_size=8, **common)
    )
    launch([console_script, "kto", "--config", single], timeout=300, env=cpu_env(), cwd=str(REPO)).check("kto")
    zero3 = write_recipe(tmp_path / "zero3.yaml", tiny_recipe("kto", zero3_out, data, **common))
    cli = ["-m", "boft_plugin", "kto", "--config", zero3]
    cmd = accelerate_cmd(str(REPO / "integrations" / "accelerate" / "zero3.yaml"), cli, num_processes=2)
    launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check("ZeRO-3 kto")

    one, sharded = summary(single_out), summary(zero3_out)
    assert (one["task"], one["engine"], sharded["engine"]) == ("kto", "single", "zero3")
    for result in (one, sharded):
        margins = result["eval_margins"]
        assert margins[0][1] == 0.0  # the reference is an exact copy of the SFT adapter, not the base
        assert margins[-1][1] > 0.0  # the reversed (desirable) completion gains over the copy
    assert [s for s, _ in one["train_loss"]] == [s for s, _ in sharded["train_loss"]]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one["train_loss"], sharded["train_loss"]))
    # the reference log-probs (computed before the policy pass under ZeRO-3) give the same reward margins
    margins_one, margins_sharded = (dict(result["eval_margins"]) for result in (one, sharded))
    assert margins_one.keys() == margins_sharded.keys()
    assert all(abs(margins_one[s] - margins_sharded[s]) <= 1e-4 * abs(margins_one[s]) for s in margins_one)
    check_verified(single_out, zero3_out)


def test_kto_resumed_from_a_checkpoint_ends_with_the_same_adapter(tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "kto"
    mapping = tiny_recipe(
        "kto", out, data, tiny_model=True, save_strategy="steps", save_steps=3, resume_from_checkpoint="auto"
    )
    recipe = write_recipe(tmp_path / "kto.yaml", mapping)
    cmd = [str(Path(sys.executable).with_name("boft-plugin")), "kto", "--config", recipe]
    launch(cmd, timeout=300, env=cpu_env(), cwd=str(REPO)).check("kto")
    trained, first = load_file(out / "adapter_model.safetensors"), summary(out)

    shutil.rmtree(out / "checkpoint-6")  # as if the run had died after step 3
    resumed = launch(cmd, timeout=300, env=cpu_env(), cwd=str(REPO)).check("kto, resumed")
    assert f"resuming from {out / 'checkpoint-3'}" in resumed.output
    again = load_file(out / "adapter_model.safetensors")
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    assert summary(out)["train_loss"][-1] == first["train_loss"][-1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": "sft"}, r"KTO expects 'prompt'\+'completion'\+'label' \(unpaired\), or preference rows"),
        ({"label": "yes"}, "column 'label' row 0 is 'yes' .str.; KTO needs true/false"),
        ({"label": 2}, "column 'label' row 0 is 2 .int.; KTO needs true/false"),
        ({"keys": {"max_prompt_len": 8}}, "unknown recipe key.* 'max_prompt_len'"),
        ({"keys": {"train_sampling_strategy": "random"}}, "TRL needs 'sequential' .KTO's default.; got 'random'"),
        ({"keys": {"per_device_train_batch_size": 1}}, "pairs each row with another of its micro-batch"),
    ],
)
def test_kto_input_that_cannot_train_is_refused_before_anything_loads(tmp_path, change, message):
    from boft_plugin.recipes import parse_recipe, prepare

    data = write_tiny_data(tmp_path / "data")
    if "label" in change:
        rows = [{"prompt": "reverse ab=", "completion": "ba", "label": change["label"]}] * 8
        data["kto"] = write_jsonl(rows, tmp_path / "data" / "bad_labels.jsonl")
    if "dataset" in change:
        data["kto"] = data[change["dataset"]]
    out = tmp_path / "out"
    keys = dict(tiny_model=True, boft_block_size=4, boft_target_modules=["q_proj"], **change.get("keys", {}))
    with pytest.raises(RecipeError, match=message):
        prepare(parse_recipe("kto", [], config=tiny_recipe("kto", out, data, **keys)))
    assert not out.exists()


def test_a_kto_key_in_an_sft_recipe_names_the_task_it_belongs_to(tmp_path):
    from boft_plugin.recipes import parse_recipe

    data = write_tiny_data(tmp_path / "data")
    with pytest.raises(RecipeError, match=r"'desirable_weight' \(a KTO key: run `boft-plugin kto`\)"):
        parse_recipe("sft", [], config=tiny_recipe("sft", tmp_path / "out", data, desirable_weight=2.0))


@pytest.mark.slow
@pytest.mark.distributed
def test_kto_on_smollm2_under_fsdp2_moves_the_margin_and_exports(tmp_path):
    """The real model (SmolLM2-135M-Instruct), a fresh adapter, 2 gloo ranks with FSDP2 pre-sharding."""
    from boft_plugin.demo.smollm2 import convert_smollm2

    data = write_tiny_data(tmp_path / "data", n_kto=32)
    out = tmp_path / "kto"
    mapping = tiny_recipe(
        "kto",
        out,
        data,
        tiny_model=False,
        model_name_or_path=str(convert_smollm2()),
        boft_block_size=8,
        boft_n_butterfly_factor=2,
        boft_target_modules=["q_proj", "v_proj"],
        fsdp2_pre_shard=True,
        max_steps=3,
        eval_steps=3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_length=48,
        learning_rate=2e-2,
        export_merged=True,
    )
    recipe = write_recipe(tmp_path / "kto.yaml", mapping)
    cmd = torchrun_cmd(["boft_plugin", "kto", "--config", recipe], nproc_per_node=2, module=True)
    launch(cmd, timeout=600, env=cpu_env(), cwd=str(REPO)).check("FSDP2 kto on SmolLM2")
    result = summary(out)
    assert result["engine"] == "fsdp2" and result["world_size"] == 2 and result["global_step"] == 3
    margins = result["eval_margins"]
    assert margins[0][1] == 0.0 and margins[-1][1] > 0.0  # fresh adapter: the reference is the base itself
    check_verified(out)
