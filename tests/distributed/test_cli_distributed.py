"""Recipes through the command line under real multi-process launches (gloo on 127.0.0.1, 2 ranks each):

- DDP with torch.distributed.run: SFT, then DPO from its adapter;
- DeepSpeed ZeRO-3 with accelerate and integrations/accelerate/zero3.yaml: SFT, then DPO from its adapter;
- accelerate with integrations/accelerate/ddp.yaml and zero2.yaml: SFT;
- two simulated nodes (two torch.distributed.run launchers, --nnodes 2, one rank each): SFT;
- FSDP2 on the CPU (torch.distributed.run with the recipe option fsdp2_pre_shard): SFT, then DPO.

The ZeRO-3 and FSDP2 SFT runs also export their adapter as LoRA (export_lora_*), compared with the conversion of the
saved adapter in one process.

Every exported adapter is reloaded with stock PEFT (and the merged model with transformers) in a fresh process and
must reproduce the logits the training run computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from boft_plugin.export.verify import verify_in_fresh_process
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, free_port, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

CONFIGS = REPO / "integrations" / "accelerate"
LAUNCH_TIMEOUT = 420  # DeepSpeed's first run compiles a small extension (~65 s)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1200)]


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "boft_run_summary.json").read_text())


def cli(task: str, recipe: str) -> list[str]:
    return ["boft_plugin", task, "--config", recipe]


def launch_torchrun(task: str, recipe: str, what: str) -> None:
    cmd = torchrun_cmd(cli(task, recipe), nproc_per_node=2, module=True)
    launch(cmd, timeout=LAUNCH_TIMEOUT, env=cpu_env(), cwd=str(REPO)).check(what)


def launch_accelerate(config: str, task: str, recipe: str, what: str) -> None:
    cmd = accelerate_cmd(str(CONFIGS / config), ["-m", *cli(task, recipe)], num_processes=2)
    launch(cmd, timeout=LAUNCH_TIMEOUT, env=cpu_env(), cwd=str(REPO)).check(what)


def check_reloads(*output_dirs: Path) -> None:
    for report in verify_in_fresh_process(*output_dirs, timeout=300):
        assert report["ok"], report
        assert report["n_butterfly_factor"] == 2
        assert report["oracle_rel_err"] < 1e-5
        if "merged_rel_err" in report:
            assert report["merged_rel_err"] < 1e-5


def sft_then_dpo(tmp_path: Path, launch_task, dpo_extra: dict | None = None, **sft_extra) -> tuple[dict, dict]:
    data = write_tiny_data(tmp_path / "data")
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    sft = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", sft_out, data, export_merged=True, **sft_extra))
    dpo = write_recipe(
        tmp_path / "dpo.yaml", tiny_recipe("dpo", dpo_out, data, init_adapter=str(sft_out), **(dpo_extra or {}))
    )
    launch_task("sft", sft)
    launch_task("dpo", dpo)
    sft_summary, dpo_summary = summary(sft_out), summary(dpo_out)
    assert sft_summary["world_size"] == dpo_summary["world_size"] == 2  # really distributed, not 2 lone ranks
    assert sft_summary["eval_last"]["eval_loss"] < sft_summary["eval_first"]["eval_loss"]
    margins = dpo_summary["eval_margins"]
    assert margins[0][1] == 0.0 and margins[-1][1] > 0.0  # reference == SFT adapter at the start; margin rises
    check_reloads(sft_out, dpo_out)
    return sft_summary, dpo_summary


def check_lora_export(output_dir: Path, **options) -> None:
    """``<output_dir>/lora`` written by the sharded run equals the conversion of the saved adapter in one process
    (products ``B @ A``: the SVD's signs are free), and stock PEFT reloads it (verify's ``lora`` entry)."""
    from safetensors.torch import load_file

    from boft_plugin.export import convert_to_lora

    files = convert_to_lora(output_dir, output_dir.parent / f"{output_dir.name}_lora_files", probe=False, **options)
    sharded = load_file(output_dir / "lora" / "adapter_model.safetensors")
    single = load_file(output_dir.parent / f"{output_dir.name}_lora_files" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(single) and len(files.layers) == len(sharded) // 2
    for key in (k for k in sharded if k.endswith("lora_A.weight")):
        up = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(sharded[up] @ sharded[key], single[up] @ single[key], atol=1e-6, rtol=1e-4)
    (report,) = verify_in_fresh_process(output_dir, timeout=300)
    assert report["lora"]["loads"], report["lora"]
    if report["lora"]["recorded_max_delta_error"] < 1e-6:  # a full-rank conversion is exact
        assert report["lora"]["rel_err"] < 1e-5, report["lora"]


def test_ddp_torchrun_sft_then_dpo(tmp_path):
    sft_then_dpo(tmp_path, lambda task, recipe: launch_torchrun(task, recipe, f"DDP {task}"))


def test_zero3_accelerate_sft_then_dpo(tmp_path):
    from safetensors.torch import load_file

    sft, _ = sft_then_dpo(
        tmp_path,
        lambda task, recipe: launch_accelerate("zero3.yaml", task, recipe, f"ZeRO-3 {task}"),
        save_strategy="steps",
        save_steps=3,
        export_lora_rank=64,  # full rank of every tiny-model layer: exact
    )
    check_lora_export(tmp_path / "sft", rank=64)
    # the Trainer's own ZeRO-3 checkpoint holds gathered adapter tensors (stage3_gather_16bit_weights_on_model_save)
    final = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    checkpoint = load_file(tmp_path / "sft" / "checkpoint-3" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in checkpoint.items()} == {k: v.shape for k, v in final.items()}
    assert all(v.numel() > 0 for v in checkpoint.values())


def test_accelerate_ddp_and_zero2_sft(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    outputs = []
    for config in ("ddp.yaml", "zero2.yaml"):
        out = tmp_path / config.split(".")[0]
        recipe = write_recipe(tmp_path / f"{out.name}.yaml", tiny_recipe("sft", out, data))
        launch_accelerate(config, "sft", recipe, f"accelerate {config}")
        assert summary(out)["world_size"] == 2
        outputs.append(out)
    ddp, zero2 = (summary(out)["train_loss"] for out in outputs)
    assert [step for step, _ in ddp] == [step for step, _ in zero2]
    assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(ddp, zero2))  # same global batch, same losses
    check_reloads(*outputs)


def test_two_simulated_nodes_sft(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "sft"
    recipe = write_recipe(tmp_path / "sft.yaml", tiny_recipe("sft", out, data))
    port = free_port()
    nodes = [
        torchrun_cmd(cli("sft", recipe), nproc_per_node=1, nnodes=2, node_rank=rank, master_port=port, module=True)
        for rank in (0, 1)
    ]
    launch(nodes, timeout=LAUNCH_TIMEOUT, env=cpu_env(), cwd=str(REPO)).check("two-node SFT")
    assert summary(out)["world_size"] == 2
    check_reloads(out)


def test_fsdp2_pre_shard_torchrun_sft_then_dpo(tmp_path):
    """The CPU route to FSDP2: torch.distributed.run + fsdp2_pre_shard (accelerate's FSDP does not run on the CPU).

    DPO adds the reference adapter before sharding (FSDP2 cannot take adapters added afterwards)."""
    sft_then_dpo(
        tmp_path,
        lambda task, recipe: launch_torchrun(task, recipe, f"FSDP2 {task}"),
        fsdp2_pre_shard=True,
        dpo_extra={"fsdp2_pre_shard": True},
        export_lora_max_error=0.3,
        export_lora_ranks="vllm",
    )
    check_lora_export(tmp_path / "sft", max_error=0.3, ranks="vllm")


def test_fsdp2_hsdp_two_simulated_nodes_of_two_ranks(tmp_path):
    """fsdp2_hsdp: a (nodes, ranks per node) mesh, sharded within a node and replicated across the two nodes."""
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "sft"
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        tiny_recipe("sft", out, data, fsdp2_pre_shard=True, fsdp2_hsdp=True, per_device_train_batch_size=2),
    )
    port = free_port()
    nodes = [
        torchrun_cmd(cli("sft", recipe), nproc_per_node=2, nnodes=2, node_rank=rank, master_port=port, module=True)
        for rank in (0, 1)
    ]
    result = launch(nodes, timeout=LAUNCH_TIMEOUT, env=cpu_env(), cwd=str(REPO)).check("HSDP SFT")
    assert "FSDP2 mesh (2, 2) ('replicate', 'shard')" in result.output
    assert summary(out)["world_size"] == 4
    check_reloads(out)


def test_gpu_deepspeed_configs_run_on_the_cpu_with_bf16(tmp_path):
    """integrations/accelerate/zero{2,3}_gpu.yaml (overlap_comm, larger ZeRO-3 live set) with a recipe's bf16:
    DeepSpeed's torch_autocast on 2 ranks; float32 adapters; both stages give the same losses."""
    from safetensors.torch import load_file

    data = write_tiny_data(tmp_path / "data")
    losses = []
    for config in ("zero2_gpu.yaml", "zero3_gpu.yaml"):
        out = tmp_path / config.split(".")[0]
        recipe = write_recipe(tmp_path / f"{out.name}.yaml", tiny_recipe("sft", out, data, bf16=True))
        launch_accelerate(config, "sft", recipe, f"accelerate {config}")
        assert summary(out)["world_size"] == 2
        assert all(t.dtype == torch.float32 for t in load_file(out / "adapter_model.safetensors").values())
        losses.append(summary(out)["train_loss"])
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]]
    assert all(abs(a - b) <= 5e-4 * abs(a) for (_, a), (_, b) in zip(*losses))
