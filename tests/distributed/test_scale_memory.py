"""Each rank holds about 1/W of the base model, measured from the processes: ZeRO-3 (accelerate zero3.yaml) and FSDP2
(torch.distributed.run + fsdp2_pre_shard) on 2 gloo ranks, SFT through the CLI on a ~43M-parameter fp32 Llama (172
MiB) saved in 50 MB safetensors shards. The recipe's summary records every rank's peak RssAnon per phase (sampled
from /proc/self/status by boft_plugin.runtime.process_memory.PhasePeaks). Loading and the merged export may each add
at most

    model/W + 2 x the largest tensor + 64 MiB

to what the rank held when the phase began (the largest tensor: ZeRO-3 allocates each parameter whole before
partitioning it, an export gathers one whole tensor and merges it). Before this was built each rank added the whole
model while loading, and rank 0 another whole model in the merged export (docs/design.md, "Holding 1/W of the base
model").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.recipes import tiny_recipe, write_tiny_data

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1200)]

MARGIN_MIB = 64
WORLD = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, float, float]:
    """A ~43M-parameter Llama (172 MiB fp32) in 50 MB shards; returns (directory, model MiB, largest tensor MiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from boft_plugin.toy.models import char_tokenizer

    path = tmp_path_factory.mktemp("llama_small")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="50MB")
    char_tokenizer().save_pretrained(path)
    sizes = [p.numel() * p.element_size() / 2**20 for p in model.parameters()]
    return path, sum(sizes), max(sizes)


def run_engine(tmp_path: Path, engine: str, checkpoint_dir: Path) -> dict:
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / engine
    mapping = tiny_recipe(
        "sft",
        out,
        data,
        max_steps=1,
        eval_strategy="no",
        eval_on_start=False,
        export_merged=True,
        probe_text=None,
        model_name_or_path=str(checkpoint_dir),
        boft_block_size=8,
        per_device_train_batch_size=2,
        fsdp2_pre_shard=engine == "fsdp2",
    )
    mapping.pop("tiny_model")
    config = tmp_path / f"{engine}.yaml"
    config.write_text(yaml.safe_dump(mapping))
    cli = ["boft_plugin", "sft", "--config", str(config)]
    if engine == "zero3":
        cmd = accelerate_cmd(str(REPO / "integrations/accelerate/zero3.yaml"), ["-m", *cli], num_processes=WORLD)
    else:
        cmd = torchrun_cmd(cli, nproc_per_node=WORLD, module=True)
    output = launch(cmd, timeout=900, env=cpu_env(), cwd=str(REPO)).check(f"{engine} SFT").output
    assert ("ZeRO-3: " if engine == "zero3" else "FSDP2: ") in output  # the sharded loader ran
    return json.loads((out / "boft_run_summary.json").read_text()), out


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_loading_and_merged_export_hold_about_one_wth_of_the_model_per_rank(tmp_path, checkpoint, engine):
    checkpoint_dir, model_mib, largest_mib = checkpoint
    summary, out = run_engine(tmp_path, engine, checkpoint_dir)
    by_rank = summary["rss_anon_mib_by_rank"]
    assert len(by_rank) == WORLD
    bound = model_mib / WORLD + 2 * largest_mib + MARGIN_MIB
    for rank, phases in enumerate(by_rank):
        print(f"{engine} rank {rank} (model {model_mib:.0f} MiB, bound {bound:.0f} MiB per phase): {phases}")
        for phase in ("load", "export_merged"):
            added = phases[phase]["peak_mib"] - phases[phase]["start_mib"]
            assert added <= bound, f"rank {rank} {phase}: +{added:.0f} MiB > {bound:.0f} MiB"
    merged = {}  # the merged export is complete (an identity adapter after 1 step: nearly the base weights)
    for name in sorted(p.name for p in (out / "merged").glob("*.safetensors")):
        merged.update(load_file(out / "merged" / name))
    original = {}
    for name in sorted(p.name for p in checkpoint_dir.glob("*.safetensors")):
        original.update(load_file(checkpoint_dir / name))
    assert merged.keys() == original.keys()
    assert torch.equal(merged["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # not adapted
    assert all(merged[key].shape == original[key].shape for key in original)
