"""A recipe's bf16 under DeepSpeed runs DeepSpeed's torch_autocast (float32 adapters); the run itself through the
CLI on 2 ranks: tests/distributed/test_mixed_precision.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from boft_plugin.recipes.deepspeed_precision import use_torch_autocast
from boft_plugin.testing.paths import REPO

ZERO3 = REPO / "integrations" / "deepspeed" / "zero3.json"


@pytest.fixture
def accelerate_deepspeed(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ZERO3))


def test_accelerate_route_gets_a_private_autocast_copy(accelerate_deepspeed):
    merged: dict = {"bf16": True}
    note = use_torch_autocast(merged, [], has_accelerator=False)
    assert note and "torch_autocast" in note
    copy = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    assert copy != str(ZERO3)  # the shipped file itself is never written
    config = json.loads(Path(copy).read_text())
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert config["zero_optimization"] == json.loads(ZERO3.read_text())["zero_optimization"]
    assert merged["bf16"] is False


def test_deepspeed_key_and_flags_become_a_mapping(tmp_path):
    args = ["--deepspeed", str(ZERO3), "--bf16", "--learning_rate", "1e-3"]
    merged: dict = {}
    assert use_torch_autocast(merged, args, has_accelerator=True)
    assert args == ["--learning_rate", "1e-3"]
    assert merged["deepspeed"]["torch_autocast"]["enabled"] is True and merged["bf16"] is False


@pytest.mark.parametrize(
    "merged, env",
    [
        ({"bf16": False}, True),  # no bf16 asked for
        ({"bf16": True}, False),  # no DeepSpeed
        ({"bf16": True, "deepspeed": {"bf16": {"enabled": True}}}, False),  # DeepSpeed's bf16 mode, asked for
        ({"bf16": True, "deepspeed": {"torch_autocast": {"enabled": True}}}, False),  # the user's own autocast
    ],
)
def test_left_alone(monkeypatch, merged, env):
    if env:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ZERO3))
    else:
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    before = json.dumps(merged, sort_keys=True)
    assert use_torch_autocast(merged, [], has_accelerator=True) is None
    assert json.dumps(merged, sort_keys=True) == before


def test_trl_default_bf16_on_a_gpu_host_counts_as_asked(accelerate_deepspeed):
    assert use_torch_autocast({}, [], has_accelerator=True)
    assert use_torch_autocast({}, [], has_accelerator=False) is None  # TRL's default is refused there anyway


def test_deepspeed_half_precision_modes_are_refused_without_a_gpu(accelerate_deepspeed, tmp_path, monkeypatch):
    from boft_plugin.errors import RecipeError
    from boft_plugin.recipes.deepspeed_precision import check_half_precision_has_a_gpu

    check_half_precision_has_a_gpu({"bf16": False}, [], has_accelerator=False)  # fp32: nothing to refuse
    check_half_precision_has_a_gpu({"fp16": True}, [], has_accelerator=True)  # a GPU host: DeepSpeed's business
    with pytest.raises(RecipeError, match="refuses it on a machine without GPUs"):
        check_half_precision_has_a_gpu({"fp16": True, "bf16": False}, [], has_accelerator=False)
    own_mode = tmp_path / "ds.json"
    own_mode.write_text(json.dumps({"bf16": {"enabled": True}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(own_mode))
    merged: dict = {"bf16": True}
    assert use_torch_autocast(merged, [], has_accelerator=False) is None  # the config's own mode is kept...
    with pytest.raises(RecipeError):  # ...and refused here, in one line
        check_half_precision_has_a_gpu(merged, [], has_accelerator=False)


def test_deepspeed_half_mode_is_read_from_the_config_the_trainer_gets():
    from boft_plugin.recipes.deepspeed_precision import deepspeed_half_mode

    assert deepspeed_half_mode({}, [], True) is None  # no DeepSpeed
    assert deepspeed_half_mode({"deepspeed": {"bf16": {"enabled": True}}, "bf16": False}, [], True) == "bfloat16"
    assert deepspeed_half_mode({"deepspeed": {"fp16": {"enabled": "true"}}, "bf16": False}, [], True) == "float16"
    assert deepspeed_half_mode({"deepspeed": {}, "bf16": True}, [], True) is None  # no section: DeepSpeed's off
    # "auto" is filled from the recipe's own precision by transformers
    auto = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "torch_autocast": {"enabled": True}}
    assert deepspeed_half_mode({"deepspeed": auto, "bf16": True}, [], True) == "bfloat16"
    assert deepspeed_half_mode({"deepspeed": auto, "bf16": False, "fp16": True}, [], True) == "float16"
    assert deepspeed_half_mode({"deepspeed": auto}, ["--bf16", "false"], True) is None
    merged: dict = {"deepspeed": {"bf16": {"enabled": "auto"}}, "bf16": True}
    assert use_torch_autocast(merged, [], has_accelerator=True)  # rewritten to torch_autocast: nothing is cast
    assert deepspeed_half_mode(merged, [], True) is None


def test_the_autocast_copy_survives_trl_setting_the_yamls_env_again(tmp_path, monkeypatch):
    """TRL's parse_args_and_config sets the YAML's env after our preparation: when it parses the flags, the
    DeepSpeed config accelerate will read must still be the private torch_autocast copy, not the YAML's file."""
    from boft_plugin.recipes.parsing import RecipeParser
    from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

    class Seen(Exception):
        pass

    def stop(self, *args, **kwargs):  # the moment TRL parses the flags (a process group would be needed after)
        raise Seen(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])

    monkeypatch.setattr(RecipeParser, "parse_args_into_dataclasses", stop)
    # recorded, so that what the recipe's env sets is undone after the test
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ZERO3)}
    data = write_tiny_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data, bf16=True, env=env))
    parser = RecipeParser("sft")
    with pytest.raises(Seen) as seen:
        parser.parse_args_and_config(["--config", recipe])
    copy = str(seen.value)
    assert copy != str(ZERO3) and json.loads(Path(copy).read_text())["torch_autocast"]["enabled"] is True
    assert any("torch_autocast" in note for note in parser.notes)


def test_no_args_file_beside_the_program_is_read(tmp_path, monkeypatch):
    """transformers' parser reads ``<program>.args`` when asked to; TRL's parse asks. A recipe never does."""
    import sys

    from boft_plugin.recipes import parse_recipe
    from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

    data = write_tiny_data(tmp_path / "data")
    program = tmp_path / "prog.py"
    program.write_text("")
    (tmp_path / "prog.args").write_text("--learning_rate 0.5\n")
    monkeypatch.setattr(sys, "argv", [str(program)])
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data))
    assert parse_recipe("sft", ["--config", recipe]).training.learning_rate == 1.0e-2
