"""Recipe parsing and the checks that run before any model is loaded (no training here; a few seconds)."""

from __future__ import annotations

import os

import pytest

from boft_plugin.cli import main as cli_main
from boft_plugin.recipes import RecipeError, parse_recipe
from boft_plugin.recipes.geometry_check import check_geometry
from boft_plugin.recipes.model_source import model_config_of
from boft_plugin.recipes.parsing import cpu_launch_defaults, recipe_keys
from boft_plugin.recipes.train import prepare
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def data(tmp_path):
    return write_tiny_data(tmp_path / "data")


def run_cli(task, recipe_path, *flags):
    return cli_main([task, "--config", recipe_path, *flags])


def test_yaml_values_and_flag_overrides(tmp_path, data):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data, max_steps=50))
    recipe = parse_recipe("sft", ["--config", path, "--max_steps", "3", "--boft_block_size", "8"])
    assert recipe.training.max_steps == 3  # the flag wins over the YAML
    assert recipe.boft.boft_block_size == 8
    assert recipe.boft.boft_n_butterfly_factor == 2  # from the YAML
    assert recipe.training.learning_rate == pytest.approx(1e-2)
    assert recipe.boft.boft_target_modules == ["all-linear"]
    assert recipe.boft.to_peft_config().target_modules == "all-linear"


def test_every_trl_key_is_a_recipe_key():
    import dataclasses

    from trl import DPOConfig, ModelConfig, SFTConfig

    sft, dpo = recipe_keys("sft"), recipe_keys("dpo")
    assert {f.name for f in dataclasses.fields(SFTConfig) if f.init} <= sft
    assert {f.name for f in dataclasses.fields(DPOConfig) if f.init} <= dpo
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= sft
    assert {"boft_block_size", "boft_n_butterfly_factor", "init_adapter", "tiny_model", "model_config"} <= sft


def test_unknown_yaml_key_fails_naming_it(tmp_path, data, capsys):
    mapping = tiny_recipe("sft", tmp_path / "out", data, learnin_rate=1e-3, boft_blok_size=8)
    code = run_cli("sft", write_recipe(tmp_path / "r.yaml", mapping))
    err = capsys.readouterr().err
    assert code == 2
    assert "'learnin_rate'" in err and "'learning_rate'" in err  # named, with a suggestion
    assert "'boft_blok_size'" in err
    assert not (tmp_path / "out").exists()  # nothing was built or trained


def test_unknown_flag_and_task_specific_keys(tmp_path, data):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data))
    with pytest.raises(RecipeError, match="'no_such_flag'"):
        parse_recipe("sft", ["--config", path, "--no_such_flag", "1"])
    owners = r"DPO / KTO / GRPO / RLOO key: run `boft-plugin dpo \| kto \| grpo \| rloo`"
    with pytest.raises(RecipeError, match=rf"'beta' .*{owners}"):
        parse_recipe("sft", ["--config", path, "--beta", "0.2"])


def test_bad_block_size_fails_before_training(tmp_path, data, capsys):
    # odd block size with two butterfly factors: refused while parsing
    mapping = tiny_recipe("sft", tmp_path / "out", data, boft_block_size=3)
    assert run_cli("sft", write_recipe(tmp_path / "r.yaml", mapping)) == 2
    err = capsys.readouterr().err
    assert "'boft_block_size'" in err and "even" in err
    # a size that does not divide the layer widths: refused from the model config (meta device, no weights)
    mapping = tiny_recipe("sft", tmp_path / "out", data, boft_block_size=48)
    assert run_cli("sft", write_recipe(tmp_path / "r2.yaml", mapping)) == 2
    err = capsys.readouterr().err
    assert "'boft_block_size'" in err and "width 64" in err and "q_proj" in err and "valid boft_block_size" in err
    assert not (tmp_path / "out" / "base_model").exists()  # no model was built
    # both sizes at once
    with pytest.raises(RecipeError, match="boft_block_size.*boft_block_num"):
        parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "o", data, boft_block_num=8))


def test_missing_dataset_file_fails_naming_it(tmp_path, data, capsys):
    mapping = tiny_recipe("sft", tmp_path / "out", data, dataset_name=str(tmp_path / "nope" / "train.jsonl"))
    assert run_cli("sft", write_recipe(tmp_path / "r.yaml", mapping)) == 2
    err = capsys.readouterr().err
    assert "nope/train.jsonl" in err and "does not exist" in err and "'dataset_name'" in err
    assert not (tmp_path / "out").exists()


def test_wrong_columns_name_found_and_expected(tmp_path, data):
    # an SFT file given to DPO
    recipe = parse_recipe(
        "dpo", config=tiny_recipe("dpo", tmp_path / "out", data, dataset_name=str(data["sft"]), boft_block_size=4)
    )
    with pytest.raises(RecipeError) as info:
        prepare(recipe)
    message = str(info.value)
    assert str(data["sft"]) in message and "['prompt', 'completion']" in message and "'chosen'" in message


def test_geometry_checked_from_the_config_only(tmp_path, data):
    recipe = parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "out", data))
    config = model_config_of(recipe)
    assert check_geometry(config, recipe.boft.to_peft_config()) == 14  # 7 linear layers x 2 decoder layers
    recipe = parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "out", data, boft_target_modules=["lm_head"]))
    with pytest.raises(RecipeError, match="output layer 'lm_head'"):
        check_geometry(config, recipe.boft.to_peft_config())
    recipe = parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "out", data, boft_target_modules=["nothing"]))
    with pytest.raises(RecipeError, match="matches no linear module"):
        check_geometry(config, recipe.boft.to_peft_config())


def test_refused_and_conflicting_keys(tmp_path, data):
    with pytest.raises(RecipeError, match="'lora_r'"):
        parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "o", data, lora_r=8))
    with pytest.raises(RecipeError, match="'use_dora'"):
        parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "o", data, use_dora=True))
    with pytest.raises(RecipeError, match="'init_adapter'"):
        parse_recipe("dpo", config=tiny_recipe("dpo", tmp_path / "o", data, init_adapter=str(tmp_path)))
    with pytest.raises(RecipeError, match="'boft_dropout'"):
        parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "o", data, boft_dropout=1.5))
    with pytest.raises(RecipeError, match="'boft_bias'"):
        parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "o", data, boft_bias="some"))
    recipe = parse_recipe("sft", config=tiny_recipe("sft", tmp_path / "o", data, model_name_or_path=str(tmp_path)))
    with pytest.raises(RecipeError, match="exactly one model source"):
        prepare(recipe)


def test_cpu_launch_defaults(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch, "accelerator", None) is not None:
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert cpu_launch_defaults({}, []) == {"use_cpu": True}
    assert cpu_launch_defaults({"use_cpu": False}, []) == {}
    assert cpu_launch_defaults({}, ["--no_use_cpu"]) == {}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_launch_defaults({}, []) == {"ddp_backend": "gloo", "bf16": False}
    assert cpu_launch_defaults({"bf16": True}, []) == {"ddp_backend": "gloo"}


def test_help_lists_trl_and_boft_keys(capsys):
    assert cli_main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--beta" in out and "--boft_n_butterfly_factor" in out and "--init_adapter" in out
    assert cli_main(["nonsense"]) == 2


def test_recipes_are_parsed_by_trls_own_parse_args_and_config(tmp_path, data, monkeypatch):
    """The recipe parser is a TrlParser whose YAML, env and flag handling is TRL's (only the checks are ours)."""
    from trl import TrlParser

    from boft_plugin.recipes.parsing import make_parser

    calls = []
    original = TrlParser.parse_args_and_config

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrlParser, "parse_args_and_config", spy)
    mapping = tiny_recipe("sft", tmp_path / "out", data, env={"BOFT_TEST_RECIPE_ENV": "from-yaml"})
    path = write_recipe(tmp_path / "r.yaml", mapping)
    monkeypatch.delenv("BOFT_TEST_RECIPE_ENV", raising=False)
    recipe = parse_recipe("sft", ["--config", path, "--learning_rate", "0.5"])
    assert calls == ["RecipeParser"] and isinstance(make_parser("sft"), TrlParser)
    assert recipe.training.learning_rate == 0.5 and recipe.training.max_steps == mapping["max_steps"]
    assert os.environ["BOFT_TEST_RECIPE_ENV"] == "from-yaml"  # the YAML's env


def test_config_given_with_an_equals_sign_is_read(tmp_path, data):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data, max_steps=7))
    recipe = parse_recipe("sft", [f"--config={path}"])
    assert recipe.config_path == path and recipe.training.max_steps == 7
    assert recipe.training.output_dir == str(tmp_path / "out")
