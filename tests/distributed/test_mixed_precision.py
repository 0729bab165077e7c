"""bf16 end to end: each engine on 2 gloo ranks against one process in the same precision.

- autocast (``bf16: true``), SFT through the CLI: one process vs DDP on 2 ranks;
- FSDP2 mixed precision (``fsdp2_pre_shard`` + ``bf16: true`` = ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)``), SFT through the CLI: 1 rank vs 2 ranks;
- DeepSpeed ZeRO-3 with a recipe's ``bf16: true`` through the CLI: DeepSpeed's ``torch_autocast`` (float32
  parameters and checkpoints; boft_plugin.recipes.deepspeed_precision), 2 ranks vs one autocast process;
- DeepSpeed ZeRO-2 / ZeRO-3 with its own ``bf16`` section (a config that enables it itself): transformers refuses it
  on a machine without GPUs, so it is run through ``deepspeed.initialize`` directly (tests/workers/train_worker.py):
  1 rank vs 2 ranks.

bf16 rounding makes ranks differ more than fp32 (1e-7): the bounds are the measured bf16 gaps x ~5 (docs/numerics.md).
Every exported adapter is float32 (the fp32 master), and reloads in a fresh process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from boft_plugin.export.verify import verify_in_fresh_process
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO, WORKERS
from boft_plugin.testing.recipes import tiny_recipe, write_tiny_data

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1200)]

WORKER = str(WORKERS / "train_worker.py")
TIMEOUT = 420
LOSS_REL = 5e-4  # measured bf16 gaps: 7.3e-5 (autocast DDP), 1.9e-5 (FSDP2), 3.9e-5 (DeepSpeed)
UPDATE_REL = 0.1  # relative L2 of the adapter update: measured 1.0e-2 / 1.5e-2 / 3.3e-3


def update_gap(got: dict, want: dict) -> float:
    """Relative L2 difference of two adapters' updates (boft_R from 0, boft_s from 1)."""
    num = den = 0.0
    for key, value in want.items():
        start = torch.ones_like(value) if key.endswith("boft_s") else torch.zeros_like(value)
        num += float(((got[key] - value) ** 2).sum())
        den += float(((value - start) ** 2).sum())
    return (num / den) ** 0.5


def sft(tmp_path: Path, name: str, data: dict, world: int, accelerate_config: str | None = None, **extra) -> Path:
    out = tmp_path / name
    per_device = 4 if world == 2 else 8
    mapping = tiny_recipe(
        "sft",
        out,
        data,
        bf16=True,
        per_device_train_batch_size=per_device,
        max_steps=6,
        eval_strategy="no",
        eval_on_start=False,
        logging_steps=1,
        **extra,
    )
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(mapping))
    cli = ["boft_plugin", "sft", "--config", str(config)]
    single = world == 1 and not extra.get("fsdp2_pre_shard")
    cmd = [sys.executable, "-m", *cli] if single else torchrun_cmd(cli, nproc_per_node=world, module=True)
    if accelerate_config:
        cmd = accelerate_cmd(str(REPO / "integrations" / "accelerate" / accelerate_config), ["-m", *cli], world)
    launch(cmd, timeout=TIMEOUT, env=cpu_env(), cwd=str(REPO)).check(f"bf16 SFT {name}")
    return out


def compare_runs(one: Path, two: Path) -> None:
    losses = [json.loads((d / "boft_run_summary.json").read_text())["train_loss"] for d in (one, two)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]]
    for (_, a), (_, b) in zip(*losses):
        assert abs(a - b) <= LOSS_REL * abs(a), (a, b)
    got, want = (load_file(d / "adapter_model.safetensors") for d in (two, one))
    assert all(t.dtype == torch.float32 for t in got.values())  # exported from the fp32 master
    assert update_gap(got, want) <= UPDATE_REL


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))


def test_autocast_bf16_one_process_and_ddp(tmp_path, data):
    one, two = sft(tmp_path, "single", data, 1), sft(tmp_path, "ddp", data, 2)
    compare_runs(one, two)
    for report in verify_in_fresh_process(one, two, timeout=300):
        # the probe ran the model's own forward (no autocast wrapper): a float32 reload matches to fp32 accuracy
        assert report["ok"] and report["probe_compute_dtype"] == "torch.float32", report
        assert report["oracle_rel_err"] < 1e-5


def test_fsdp2_mixed_precision_one_and_two_ranks(tmp_path, data):
    one = sft(tmp_path, "fsdp2_w1", data, 1, fsdp2_pre_shard=True)
    two = sft(tmp_path, "fsdp2_w2", data, 2, fsdp2_pre_shard=True)
    compare_runs(one, two)
    for report in verify_in_fresh_process(two, timeout=300):
        # FSDP2 computed in bf16 (param_dtype): the probe says so and verify compares with the bf16 tolerance
        assert report["ok"] and report["probe_compute_dtype"] == "torch.bfloat16", report


def test_deepspeed_bf16_through_the_cli_is_torch_autocast(tmp_path, data):
    """``bf16: true`` with integrations/accelerate/zero3.yaml ('auto' precision): DeepSpeed's torch_autocast, so the
    parameters, the Trainer's ZeRO-3 checkpoints and the export stay float32; losses as one autocast process."""
    one = sft(tmp_path, "single", data, 1)
    two = sft(tmp_path, "zero3_w2", data, 2, accelerate_config="zero3.yaml", save_strategy="steps", save_steps=3)
    compare_runs(one, two)
    checkpoint = load_file(two / "checkpoint-3" / "adapter_model.safetensors")
    assert checkpoint and all(t.dtype == torch.float32 and t.numel() > 0 for t in checkpoint.values())
    assert json.loads((two / "boft_run_summary.json").read_text())["world_size"] == 2


def _worker(engine: str, world: int, base: Path, out: Path) -> dict:
    args = [WORKER, "--engine", engine, "--base", str(base), "--out", str(out), "--factors", "2", "--bf16"]
    args += ["--init", "identity"]  # so that the adapter update is what training changed
    launch(torchrun_cmd(args, nproc_per_node=world), timeout=TIMEOUT, env=cpu_env()).check(f"{engine} bf16 W={world}")
    return json.loads((out / "m2" / "result.json").read_text())


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_bf16_one_and_two_ranks(tmp_path, engine):
    from boft_plugin.toy.models import tiny_llama

    base = tmp_path / "base"
    tiny_llama(seed=3, hidden_size=64, intermediate_size=96).save_pretrained(base)
    one, two = _worker(engine, 1, base, tmp_path / "w1"), _worker(engine, 2, base, tmp_path / "w2")
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= LOSS_REL * abs(a), (one["losses"], two["losses"])
    got = load_file(tmp_path / "w2" / "m2" / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "w1" / "m2" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in got.values())  # gathered from DeepSpeed's fp32 master
    assert update_gap(got, want) <= UPDATE_REL
