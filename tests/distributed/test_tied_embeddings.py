"""A base model with tied input/output embeddings (SmolLM2, Gemma, small Qwen models) through the sharded loaders.

Built empty (meta device for FSDP2, ``zero.Init`` for ZeRO-3) without transformers' initialisation, such a model
has an untied ``lm_head`` that no checkpoint holds: the FSDP2 route then refused to start, and ZeRO-3 quietly fell
back to ``from_pretrained``. Here a tied tiny Llama trains under FSDP2 (torchrun + fsdp2_pre_shard) and ZeRO-3
(accelerate zero3.yaml) on 2 gloo ranks: each must read it with the sharded loader, start from exactly the loss a
single process computes, and export a merged model that stays tied and reloads with the training run's logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from boft_plugin.export.verify import verify_in_fresh_process
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.recipes import tiny_recipe, write_tiny_data

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory) -> Path:
    from boft_plugin.toy.models import char_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("tied_llama")
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _sft(tmp_path: Path, name: str, checkpoint: Path, route: str) -> tuple[dict, str, Path]:
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / name
    recipe = tiny_recipe(
        "sft",
        out,
        data,
        tiny_model=False,
        model_name_or_path=str(checkpoint),
        max_steps=3,
        eval_steps=3,
        export_merged=True,
        fsdp2_pre_shard=route == "fsdp2",
    )
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    cli = ["boft_plugin", "sft", "--config", str(config)]
    if route == "single":
        cmd = [sys.executable, "-m", *cli]
    elif route == "fsdp2":
        cmd = torchrun_cmd(cli, nproc_per_node=2, module=True)
    else:
        cmd = accelerate_cmd(str(REPO / "integrations/accelerate/zero3.yaml"), ["-m", *cli], num_processes=2)
    output = launch(cmd, timeout=420, env=cpu_env(), cwd=str(REPO)).check(f"{name} SFT").output
    return json.loads((out / "boft_run_summary.json").read_text()), output, out


def merged_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            keys |= set(handle.keys())
    assert "model.embed_tokens.weight" in keys
    return keys


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_tied_embeddings_load_sharded_and_export_tied(tmp_path, tied_checkpoint, engine):
    single, _, _ = _sft(tmp_path, "single", tied_checkpoint, "single")
    sharded, output, out = _sft(tmp_path, engine, tied_checkpoint, engine)

    assert sharded["world_size"] == 2
    marker = "FSDP2: " if engine == "fsdp2" else "ZeRO-3: "
    loaded = [line for line in output.splitlines() if marker in line and "read" in line]
    assert loaded, f"the sharded loader did not run:\n{output[-3000:]}"
    # the adapter starts as the identity: the first evaluation is the base model's loss, lm_head included
    first, reference = sharded["eval_first"]["eval_loss"], single["eval_first"]["eval_loss"]
    assert abs(first - reference) <= 1e-4 * abs(reference), (first, reference)

    assert "lm_head.weight" not in merged_keys(out / "merged")  # still tied: written once, as save_pretrained does
    assert json.loads((out / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    for report in verify_in_fresh_process(out, timeout=300):
        assert report["ok"], report
        assert report["merged_rel_err"] < 1e-5
