"""GRPO / RLOO recipes (`boft-plugin grpo | rloo`): TRL's online-RL trainers with a BOFT adapter, through the same
strict recipe machinery as SFT / DPO / KTO. Rewards are named as in TRL's CLI and checked (imported and called once)
before any weights load; generation runs with the adapter active under every engine, one module gathered at a time
under ZeRO-3 and FSDP2."""

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

pytestmark = pytest.mark.timeout(1500)  # above the sum of each test's launch timeouts

BOFT = dict(tiny_model=True, boft_block_size=4, boft_n_butterfly_factor=2, boft_target_modules=["all-linear"])


def logged(result: dict, key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in result["log_history"] if key in entry}


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_grpo_continues_an_sft_adapter_alike_under_zero3_and_fsdp2(tmp_path):
    """2 gloo ranks each: the same seed samples the same completions under both engines, so the rewards are equal
    and the losses close; the KL term starts at exactly 0 (the reference is an exact copy of the SFT adapter, where
    TRL's own copy would leave the identity)."""
    data = write_tiny_data(tmp_path / "data")
    sft_out = tmp_path / "sft"
    sft = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", sft_out, data))
    console_script = str(Path(sys.executable).with_name("boft-plugin"))
    launch([console_script, "sft", "--config", sft], timeout=300, env=cpu_env(), cwd=str(REPO)).check("sft")

    common = dict(init_adapter=str(sft_out), export_merged=True, max_steps=3, logging_steps=1, eval_steps=3)
    zero3_out, fsdp2_out = tmp_path / "grpo_zero3", tmp_path / "grpo_fsdp2"
    zero3 = write_recipe(tmp_path / "zero3.yaml", tiny_recipe("grpo", zero3_out, data, **common))
    cmd = accelerate_cmd(
        str(REPO / "integrations" / "accelerate" / "zero3.yaml"), ["-m", "boft_plugin", "grpo", "--config", zero3], 2
    )
    launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check("ZeRO-3 grpo")
    fsdp2 = write_recipe(tmp_path / "fsdp2.yaml", tiny_recipe("grpo", fsdp2_out, data, fsdp2_pre_shard=True, **common))
    cmd = torchrun_cmd(["boft_plugin", "grpo", "--config", fsdp2], nproc_per_node=2, module=True)
    launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check("FSDP2 grpo")

    one, other = summary(zero3_out), summary(fsdp2_out)
    assert (one["engine"], other["engine"], one["world_size"], other["world_size"]) == ("zero3", "fsdp2", 2, 2)
    for result in (one, other):
        assert result["task"] == "grpo" and result["global_step"] == 3
        assert logged(result, "kl")[1] == 0.0  # the policy is the reference at the first step
        assert logged(result, "kl")[3] > 0.0  # and moves away from it
        assert any(reward > 0.0 for _, reward in result["train_reward"])
    rewards_one, rewards_other = (dict(result["train_reward"]) for result in (one, other))
    assert rewards_one.keys() == rewards_other.keys() == {1, 2, 3}
    assert all(abs(rewards_one[s] - rewards_other[s]) < 1e-6 for s in rewards_one)
    losses_one, losses_other = (dict(result["train_loss"]) for result in (one, other))
    assert losses_one.keys() == losses_other.keys() == {1, 2, 3}
    assert all(abs(losses_one[s] - losses_other[s]) < 1e-5 for s in losses_one)
    # the same completions train the same adapter (the loss alone is ~beta * KL here: advantages average to 0)
    from safetensors.torch import load_file

    initial = load_file(sft_out / "adapter_model.safetensors")
    trained_one, trained_other = (load_file(out / "adapter_model.safetensors") for out in (zero3_out, fsdp2_out))
    assert trained_one.keys() == trained_other.keys() == initial.keys()
    moved = max((trained_one[k] - initial[k]).abs().max().item() for k in initial)
    apart = max((trained_one[k] - trained_other[k]).abs().max().item() for k in initial)
    assert moved > 1e-4 and apart < 1e-3 * moved, (moved, apart)
    check_verified(zero3_out, fsdp2_out)


def test_grpo_resumed_from_a_checkpoint_ends_with_the_same_adapter(tmp_path):
    """Generation samples from torch's RNG, which the checkpoint carries: a resumed run samples the same completions
    and ends bit-identical."""
    import shutil

    import torch
    from safetensors.torch import load_file

    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "grpo"
    mapping = tiny_recipe(
        "grpo", out, data, **BOFT, save_strategy="steps", save_steps=3, resume_from_checkpoint="auto", logging_steps=1
    )
    recipe = write_recipe(tmp_path / "grpo.yaml", mapping)
    cmd = [str(Path(sys.executable).with_name("boft-plugin")), "grpo", "--config", recipe]
    launch(cmd, timeout=300, env=cpu_env(), cwd=str(REPO)).check("grpo")
    trained, first = load_file(out / "adapter_model.safetensors"), summary(out)
    assert logged(first, "loss").keys() == set(range(1, 7)) and any(logged(first, "loss").values())

    shutil.rmtree(out / "checkpoint-6")  # as if the run had died after step 3
    resumed = launch(cmd, timeout=300, env=cpu_env(), cwd=str(REPO)).check("grpo, resumed")
    assert f"resuming from {out / 'checkpoint-3'}" in resumed.output
    again = load_file(out / "adapter_model.safetensors")
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    assert logged(summary(out), "reward")[6] == logged(first, "reward")[6]


def _user_rewards(directory: Path) -> None:
    (directory / "my_rewards.py").write_text(
        "def two_per_completion(completions, **kwargs):\n"
        "    return [0.0, 1.0] * len(completions)\n"
        "def text_reward(completions, **kwargs):\n"
        "    return ['good' for _ in completions]\n"
        "def no_kwargs(completions):\n"
        "    return [0.0 for _ in completions]\n"
        "def needs_solution(completions, solution, **kwargs):\n"
        "    return [float(c == s) for c, s in zip(completions, solution)]\n"
        "async def async_reward(completions, **kwargs):\n"
        "    return [1.0 for _ in completions]\n"
        "def tensor_reward(completions, **kwargs):\n"
        "    import torch\n"
        "    return [torch.tensor(1.0) for _ in completions]\n"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reward_funcs": ["shortness"]}, "unknown reward 'shortness'; expected one of TRL's accuracy_reward"),
        ({"reward_funcs": ["no_such_module.reward"]}, "cannot import module 'no_such_module'"),
        ({"reward_funcs": ["boft_plugin.toy.rewards.nope"]}, "module 'boft_plugin.toy.rewards' has no 'nope'"),
        ({"reward_funcs": ["boft_plugin.toy.rewards.ALPHABET"]}, "is a str, not a function"),
        ({"reward_funcs": ["accuracy_reward"]}, r"'accuracy_reward' failed on the first training row .*answer"),
        ({"reward_funcs": ["my_rewards.needs_solution"]}, "failed on the first training row.*'solution'"),
        ({"reward_funcs": ["my_rewards.no_kwargs"]}, "failed on the first training row.*unexpected keyword"),
        ({"reward_funcs": ["my_rewards.two_per_completion"]}, r"returned \[0.0, 1.0\] for one completion"),
        ({"reward_funcs": ["my_rewards.text_reward"]}, r"returned \['good'\] for one completion"),
        ({"reward_funcs": None}, "`boft-plugin grpo` needs a reward: set 'reward_funcs'"),
        ({"reward_model_name_or_path": "./no_such_model"}, "'reward_model_name_or_path': ./no_such_model is not a"),
        ({"reward_weights": [1.0, 2.0]}, r"'reward_weights': 2 weight\(s\) for 1 reward\(s\)"),
        ({"dataset": "text"}, r"GRPO expects 'prompt'"),
        ({"dataset": "clash"}, r"column\(s\) \['trainer_state'\] have the names of TRL's own reward arguments"),
        ({"num_generations": 3}, "invalid recipe for `boft-plugin grpo`.*number of generations"),
        ({"per_device_train_batch_size": 128, "num_generations": 2}, "fewer than one generation batch"),
        ({"max_length": 32}, r"'max_length' \(a SFT / DPO / KTO key"),
        ({"use_vllm": True}, "'use_vllm': vLLM is not installed"),
    ],
)
def test_grpo_input_that_cannot_train_is_refused_before_anything_loads(tmp_path, monkeypatch, change, message):
    from boft_plugin.recipes import parse_recipe, prepare

    monkeypatch.chdir(tmp_path)  # the user's own reward module beside the recipe, importable as in TRL's scripts
    _user_rewards(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_tiny_data(tmp_path / "data")
    change = dict(change)
    dataset = change.pop("dataset", None)
    if dataset == "text":
        data["grpo"] = write_jsonl([{"text": "reverse ab=ba"}] * 8, tmp_path / "data" / "text.jsonl")
    if dataset == "clash":
        rows = [{"prompt": "reverse ab=", "trainer_state": "x"}] * 8
        data["grpo"] = write_jsonl(rows, tmp_path / "data" / "clash.jsonl")
    out = tmp_path / "out"
    mapping = tiny_recipe("grpo", out, data, **BOFT)
    mapping.update(change)
    mapping = {key: value for key, value in mapping.items() if value is not None}
    with pytest.raises(RecipeError, match=message):
        prepare(parse_recipe("grpo", [], config=mapping))
    assert not out.exists()


def test_grpo_rewards_are_resolved_as_trl_names_them_and_zero3_generation_defaults_to_per_module(tmp_path, monkeypatch):
    from boft_plugin.recipes import parse_recipe, prepare
    from boft_plugin.toy.rewards import alphabet_reward

    monkeypatch.chdir(tmp_path)
    _user_rewards(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_tiny_data(tmp_path / "data")
    rows = [{"prompt": [{"role": "user", "content": "2+2="}], "solution": "4"}] * 8  # think_format_reward: chat
    data["rloo"] = write_jsonl(rows, tmp_path / "data" / "math.jsonl")
    names = ["boft_plugin.toy.rewards.alphabet_reward", "think_format_reward", "my_rewards.needs_solution"]
    names += ["my_rewards.async_reward", "my_rewards.tensor_reward"]  # TRL awaits the one, makes a tensor of the other
    mapping = tiny_recipe("rloo", tmp_path / "out", data, **BOFT, reward_funcs=names, reward_weights=[1] * 5)
    recipe = parse_recipe("rloo", [], config=mapping)
    assert recipe.training.ds3_gather_for_generation is False  # the recipe default (TRL's is true)
    plan = prepare(recipe)
    assert plan.reward_funcs[0] is alphabet_reward
    assert [f.__name__ for f in plan.reward_funcs[1:]] == [
        "think_format_reward",
        "needs_solution",
        "async_reward",
        "tensor_reward",
    ]
    kept = parse_recipe("rloo", ["--ds3_gather_for_generation", "true"], config=mapping)
    assert kept.training.ds3_gather_for_generation is True  # a recipe that sets it keeps it


def _smollm2_recipe(task: str, out: Path, data: dict, **keys) -> dict:
    from boft_plugin.demo.smollm2 import convert_smollm2

    mapping = tiny_recipe(
        task,
        out,
        data,
        model_name_or_path=str(convert_smollm2()),
        boft_block_size=8,
        boft_n_butterfly_factor=2,
        boft_target_modules=["q_proj", "v_proj"],
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=8,
        max_completion_length=16,
        learning_rate=1e-2,
        beta=0.0,
        eval_strategy="no",
        eval_on_start=False,
        eval_dataset_name=None,
        export_merged=True,
    )
    mapping.update(keys)
    return mapping


def check_reward_moves(result: dict, task: str, engine: str, world_size: int) -> None:
    assert (result["task"], result["engine"], result["world_size"]) == (task, engine, world_size)
    rewards = dict(result["train_reward"])
    assert sorted(rewards) == [1, 2, 3, 4]
    assert rewards[4] > rewards[1]  # more of the letters a-h in the completions


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("task", "engine"), [("grpo", "fsdp2"), ("rloo", "zero3")])
def test_online_rl_on_smollm2_moves_the_reward_in_one_process_and_sharded_and_exports(tmp_path, task, engine):
    """The real model (SmolLM2-135M-Instruct), a fresh adapter, a rule-based reward the model can move
    (:func:`boft_plugin.toy.rewards.alphabet_reward`), in one process and on 2 gloo ranks; the exports verified."""
    data = write_tiny_data(tmp_path / "data")
    reward = {"reward_funcs": ["boft_plugin.toy.rewards.alphabet_reward"]}
    single_out, sharded_out = tmp_path / "single", tmp_path / engine
    single = write_recipe(tmp_path / "single.yaml", _smollm2_recipe(task, single_out, data, **reward))
    console_script = str(Path(sys.executable).with_name("boft-plugin"))
    launch([console_script, task, "--config", single], timeout=400, env=cpu_env(), cwd=str(REPO)).check(task)

    # the same 2 prompts x 4 completions per step: 4 completions per rank
    keys = dict(reward, per_device_train_batch_size=4, fsdp2_pre_shard=engine == "fsdp2")
    sharded = write_recipe(tmp_path / "sharded.yaml", _smollm2_recipe(task, sharded_out, data, **keys))
    if engine == "zero3":
        config = str(REPO / "integrations" / "accelerate" / "zero3.yaml")
        cmd = accelerate_cmd(config, ["-m", "boft_plugin", task, "--config", sharded], num_processes=2)
    else:
        cmd = torchrun_cmd(["boft_plugin", task, "--config", sharded], nproc_per_node=2, module=True)
    launch(cmd, timeout=600, env=cpu_env(), cwd=str(REPO)).check(f"{engine} {task} on SmolLM2")
    check_reward_moves(summary(single_out), task, "single", 1)
    check_reward_moves(summary(sharded_out), task, engine, 2)
    check_verified(single_out, sharded_out)
