"""Single-process recipe training in this process: DPO's reference, the adapter it trains, checkpoints, resume.

(The command line, the launchers and the fresh-process reload checks are in test_cli_*.py.)
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from boft_plugin import BoftNumericsError
from boft_plugin.recipes import build, make_trainer, parse_recipe, prepare, run
from boft_plugin.recipes.train import finish
from boft_plugin.testing.recipes import tiny_recipe, write_tiny_data
from boft_plugin.toy.tasks import sft_examples

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One SFT run (tiny random Llama, BOFT b=4 m=2) whose adapter the DPO tests start from."""
    root = tmp_path_factory.mktemp("sft")
    data = write_tiny_data(root / "data")
    result = run(parse_recipe("sft", config=tiny_recipe("sft", root / "sft", data)))
    return root, data, result


def adapter_params(model, name):
    return {k: p for k, p in model.named_parameters() if k.split(".")[-1] == name and "boft_" in k}


def test_sft_summary_and_exports(sft_run):
    root, _, result = sft_run
    out = root / "sft"
    summary = json.loads((out / "boft_run_summary.json").read_text())
    assert summary["eval_last"]["eval_loss"] < summary["eval_first"]["eval_loss"]
    assert {"adapter_config.json", "adapter_model.safetensors", "probe_logits.pt", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == 2
    assert config["base_model_name_or_path"] == str(out / "base_model")
    assert len(load_file(out / "adapter_model.safetensors")) == 28  # boft_R and boft_s of the 14 adapted layers
    assert result.summary["world_size"] == 1


def test_dpo_from_sft_adapter_trains_it_against_a_frozen_copy(sft_run, tmp_path):
    root, data, _ = sft_run
    sft_out = root / "sft"
    recipe = parse_recipe("dpo", config=tiny_recipe("dpo", tmp_path / "dpo", data, init_adapter=str(sft_out)))
    plan = prepare(recipe)
    built = build(plan)
    n_loaded = sum(p.numel() for p in built.model.parameters())
    trainer = make_trainer(plan, built)
    model = trainer.model

    # the reference is TRL's frozen "ref" adapter, an exact copy of the SFT adapter; no second model
    assert trainer.ref_model is None
    assert set(model.peft_config) == {"default", "ref"}
    default, ref = adapter_params(model, "default"), adapter_params(model, "ref")
    assert len(default) == len(ref) == 28  # boft_R and boft_s of 14 layers
    assert sum(p.numel() for p in model.parameters()) == n_loaded + sum(p.numel() for p in ref.values())
    saved = load_file(sft_out / "adapter_model.safetensors")
    for key, param in default.items():
        ref_param = ref[key[: -len("default")] + "ref"]
        assert torch.equal(ref_param, param) and not ref_param.requires_grad and param.requires_grad
        assert torch.equal(param.detach(), saved[key.replace(".default", "")])
    assert {k for k, p in model.named_parameters() if p.requires_grad} == set(default)
    ref_before = {k: p.detach().clone() for k, p in ref.items()}
    default_before = {k: p.detach().clone() for k, p in default.items()}

    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in default.values()}  # only the SFT adapter is trained
    assert all(torch.equal(ref[k], v) for k, v in ref_before.items())  # the reference never moves
    assert any(not torch.equal(default[k], v) for k, v in default_before.items())

    result = finish(plan, trainer, built)
    margins = result.summary["eval_margins"]
    assert margins[0] == [0, 0.0]  # policy == reference at the start
    assert margins[-1][1] > 0.0  # the reward margin rises on the toy preference set
    exported = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert set(exported) == set(saved) and not (tmp_path / "dpo" / "ref").exists()


def test_fresh_dpo_uses_the_adapter_disabled_model_as_reference(sft_run, tmp_path):
    root, data, _ = sft_run
    mapping = tiny_recipe(
        "dpo",
        tmp_path / "dpo",
        data,
        model_name_or_path=str(root / "sft" / "base_model"),
        boft_block_size=4,
        boft_n_butterfly_factor=2,
        boft_target_modules=["q_proj", "v_proj"],
    )
    recipe = parse_recipe("dpo", config=mapping)
    plan = prepare(recipe)
    built = build(plan)
    assert built.peft_config is not None  # TRL wraps the model itself
    n_base = sum(p.numel() for p in built.model.parameters())
    trainer = make_trainer(plan, built)
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default"}
    n_adapter = sum(p.numel() for p in adapter_params(trainer.model, "default").values())
    assert sum(p.numel() for p in trainer.model.parameters()) == n_base + n_adapter
    trainer.train()
    summary = finish(plan, trainer, built).summary
    assert summary["eval_margins"][0] == [0, 0.0] and summary["eval_margins"][-1][1] > 0.0


def test_checkpoints_survive_export_and_resume(tmp_path):
    train = Dataset.from_list(sft_examples(32, fmt="prompt_completion"))
    data = {"sft": "unused"}
    mapping = tiny_recipe(
        "sft",
        tmp_path / "out",
        data,
        dataset_name=None,
        eval_dataset_name=None,
        eval_strategy="no",
        eval_on_start=False,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    run(parse_recipe("sft", config=mapping), train_dataset=train)  # an in-memory dataset through the API
    out = tmp_path / "out"
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert (out / "adapter_model.safetensors").is_file() and (out / "base_model").is_dir()

    mapping.update(max_steps=6, resume_from_checkpoint="true")
    result = run(parse_recipe("sft", config=mapping), train_dataset=train)
    state = result.trainer.state
    assert state.global_step == 6 and (out / "checkpoint-6").is_dir()
    logged = [entry["step"] for entry in state.log_history if "loss" in entry]
    assert logged == [2, 4, 6]  # steps 1-4 come from checkpoint-4's state, not from training again


class _DivergeAtStep(TrainerCallback):
    """Puts a NaN in one boft_R's gradient before the optimizer step of ``step``: that step diverges."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            layer = model.base_model.model.model.layers[1].mlp.up_proj
            layer.boft_R["default"].grad.view(-1)[7] = float("nan")


def test_a_diverged_step_stops_the_run_before_its_checkpoint_is_written(tmp_path):
    train = Dataset.from_list(sft_examples(32, fmt="prompt_completion"))
    mapping = tiny_recipe(
        "sft",
        tmp_path / "out",
        {"sft": "unused"},
        dataset_name=None,
        eval_dataset_name=None,
        eval_strategy="no",
        eval_on_start=False,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
    )
    plan = prepare(parse_recipe("sft", config=mapping), train_dataset=train)
    trainer = make_trainer(plan, build(plan))
    trainer.add_callback(_DivergeAtStep(3))
    with pytest.raises(
        BoftNumericsError, match=r"layer model\.layers\.1\.mlp\.up_proj, adapter 'default': boft_R has 1 NaN"
    ):
        trainer.train()
    saved = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved == ["checkpoint-1", "checkpoint-2"]  # the last good one is there, the diverged step's is not


def test_torch_compile_through_the_recipe(tmp_path):
    """``torch_compile: true`` (TrainingArguments' own key) trains the compiled model; aot_eager keeps it quick."""
    train = Dataset.from_list(sft_examples(32, fmt="prompt_completion"))
    mapping = tiny_recipe(
        "sft",
        tmp_path / "out",
        {"sft": "unused"},
        dataset_name=None,
        eval_dataset_name=None,
        eval_strategy="no",
        eval_on_start=False,
        max_steps=3,
        logging_steps=1,
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    plan = prepare(parse_recipe("sft", config=mapping), train_dataset=train)
    trainer = make_trainer(plan, build(plan))
    trainer.train()
    assert hasattr(trainer.model_wrapped, "_orig_mod") or hasattr(trainer.model, "_orig_mod")  # really compiled
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
