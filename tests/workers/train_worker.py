"""One rank of a distributed parity run: train a tiny BOFT Llama a few steps, export, record.

Launched by tests through ``torch.distributed.run`` (or run plainly with ``--engine single`` for the
one-process reference). Every engine sees the same global batch: rank r takes rows ``r*G/W .. (r+1)*G/W``.

    python -m torch.distributed.run --nproc_per_node 2 train_worker.py --engine zero3 --base DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

ENGINES = ("single", "ddp", "zero2", "zero3", "zero3_init", "fsdp2", "fsdp2_meta")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--base", required=True, help="directory of the saved base model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--factors", default="2,4")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--init", choices=("random", "identity"), default="random")
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed engines: bf16 with an fp32 master copy")
    return parser.parse_args()


def materialize_from_meta(model, base_dir: str) -> None:
    """The FSDP2 meta-device route of the README: each rank reads its own shards from the safetensors files."""
    from boft_plugin.distributed.fsdp2.loading import load_sharded_base_weights

    load_sharded_base_weights(model, base_dir)


def main() -> None:
    args = parse()
    from peft import BOFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import boft_plugin
    from boft_plugin.distributed.report import adapter_shards
    from boft_plugin.testing.engines import deepspeed_config, init_cpu_process_group, optimizer_step, wrap_for_engine

    distributed = args.engine != "single"
    rank, world = init_cpu_process_group(args.engine)
    boft_plugin.register()

    for factors in [int(f) for f in args.factors.split(",")]:
        out = Path(args.out) / f"m{factors}"
        keep_alive = None
        if args.engine == "zero3_init":
            from transformers.integrations import HfDeepSpeedConfig

            config = deepspeed_config(3, args.global_batch // world, world, stage3_param_persistence_threshold=0)
            keep_alive = HfDeepSpeedConfig(config)  # must outlive from_pretrained: it turns on zero.Init
        if args.engine == "fsdp2_meta":
            from transformers import AutoConfig

            with torch.device("meta"):
                base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.base), dtype=torch.float32)
        else:
            base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        torch.manual_seed(100 + factors)
        peft_config = BOFTConfig(
            target_modules="all-linear",
            boft_block_size=args.block_size,
            boft_n_butterfly_factor=factors,
            init_weights=args.init == "identity",
        )
        model = get_peft_model(base, peft_config)
        runner, optimizer, engine = wrap_for_engine(
            args.engine,
            model,
            args.lr,
            args.global_batch // world,
            world,
            bf16=args.bf16,
            stage3_param_persistence_threshold=0,
        )
        if args.engine == "fsdp2_meta":
            materialize_from_meta(model, args.base)

        ids = torch.randint(
            0, base.config.vocab_size, (args.global_batch, args.seq), generator=torch.Generator().manual_seed(7)
        )
        per_rank = args.global_batch // world
        local = ids[rank * per_rank : (rank + 1) * per_rank]
        losses = []
        runner.train()
        for _ in range(args.steps):
            loss = runner(input_ids=local, labels=local).loss
            optimizer_step(loss, optimizer, engine)
            value = loss.detach().clone()
            if distributed:
                dist.all_reduce(value)
            losses.append(value.item() / world)

        plain_save = None
        if args.engine != "single":
            # Right after training (shards not gathered): PEFT's own save_pretrained must refuse under ZeRO-3/FSDP2.
            try:
                model.save_pretrained(str(out / f"plain_save_rank{rank}"))
                plain_save = "written"
            except boft_plugin.BoftSaveError:
                plain_save = "refused"
        runner.eval()
        probe = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            logits = runner(input_ids=probe).logits
        shards = [row.as_dict() for row in adapter_shards(model)]
        boft_plugin.export_adapter(runner, out / "adapter")
        boft_plugin.export_merged(runner, out / "merged")
        # the weight-sync stream (TRL's vLLM path): every rank iterates, rank 0 keeps what it would push
        from boft_plugin.export.weight_stream import iter_merged_weights

        streamed = {name: tensor.clone() for name, tensor in iter_merged_weights(runner)}
        with torch.no_grad():
            after_stream = runner(input_ids=probe).logits  # the trained model is untouched by the stream
        if rank == 0:
            from safetensors.torch import save_file

            save_file({name: tensor.contiguous() for name, tensor in streamed.items()}, out / "streamed.safetensors")
        del streamed
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "shards" / f"rank{rank}.json").write_text(json.dumps(shards))
        if rank == 0:
            torch.save({"probe": probe, "logits": logits.float()}, out / "logits.pt")
            torch.save({"logits": after_stream.float()}, out / "logits_after_stream.pt")
            result = {
                "engine": args.engine,
                "world": world,
                "factors": factors,
                "losses": losses,
                "plain_save": plain_save,
            }
            (out / "result.json").write_text(json.dumps(result))
        del keep_alive
    if distributed:
        from boft_plugin.runtime.process_exit import exit_after_distributed_run

        dist.barrier()
        exit_after_distributed_run(0)  # destroys the group; gloo threads outlive it (boft_plugin.runtime.process_exit)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
