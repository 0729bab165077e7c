"""One rank of the sharding benchmark: what each rank stores of the adapter, and the step time, per engine.

Launched by ``bench_sharding.py`` through ``torch.distributed.run`` (or plainly for ``--engine single``).
Each rank writes ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("single", "ddp", "zero2", "zero3", "fsdp2"), required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--factors", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from peft import BOFTConfig, get_peft_model

    import boft_plugin
    from boft_plugin.distributed.report import adapter_shards, optimizer_state_bytes
    from boft_plugin.testing.engines import init_cpu_process_group, optimizer_step, wrap_for_engine
    from boft_plugin.toy.models import tiny_llama

    distributed = args.engine != "single"
    rank, world = init_cpu_process_group(args.engine)
    boft_plugin.register()
    model = tiny_llama(
        seed=0,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
    )
    config = BOFTConfig(
        target_modules="all-linear", boft_block_size=args.block_size, boft_n_butterfly_factor=args.factors
    )
    model = get_peft_model(model, config)
    total_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runner, optimizer, engine = wrap_for_engine(args.engine, model, 1e-4, args.micro_batch, world)

    ids = torch.randint(0, 1024, (args.micro_batch, args.seq), generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = runner(input_ids=ids, labels=ids).loss
        optimizer_step(loss, optimizer, engine)
        if distributed:
            dist.barrier()
        if step:  # the first step is warm-up
            times.append(time.perf_counter() - start)

    rows = adapter_shards(model)
    local_r = sum(r.local_elements for r in rows)
    local_params = local_r + _local_scale_elements(model)
    result = {
        "engine": args.engine,
        "world": world,
        "rank": rank,
        "adapter_params_total": total_adapter,
        "adapter_params_local": local_params,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "master_bytes": _deepspeed_master_bytes(optimizer),
        "whole_blocks": all(r.whole_blocks for r in rows),
        "step_ms": 1000 * statistics.median(times),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    if distributed:
        from boft_plugin.runtime.process_exit import exit_after_distributed_run

        dist.barrier()
        exit_after_distributed_run(0)  # destroys the group; gloo threads outlive it (boft_plugin.runtime.process_exit)


def _local_scale_elements(model) -> int:
    """Elements of ``boft_s`` this rank stores."""
    from torch.distributed.tensor import DTensor

    total = 0
    for name, param in model.named_parameters():
        if "boft_s" not in name:
            continue
        if isinstance(param, DTensor):
            total += param.to_local().numel()
        elif hasattr(param, "ds_tensor"):
            total += param.ds_tensor.numel()
        else:
            total += param.numel()
    return total


def _deepspeed_master_bytes(optimizer) -> int:
    """fp32 flat partitions DeepSpeed keeps besides the model parameters (0 for torch optimizers)."""
    total = 0
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        for tensor in getattr(optimizer, attr, None) or []:
            total += tensor.numel() * tensor.element_size()
    return total


if __name__ == "__main__":
    main()
