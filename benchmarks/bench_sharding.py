"""Per-rank adapter + optimizer memory and step time under each engine, for W = 1, 2, 4 ranks (CPU, gloo).

    python benchmarks/bench_sharding.py [--worlds 1 2 4] [--engines ddp zero2 zero3 fsdp2] [--json out.json]

Each (engine, W) is one ``torch.distributed.run`` launch of ``shard_worker.py`` on 127.0.0.1. Memory is what
each rank holds of the BOFT adapter: its local parameters (``boft_R`` and ``boft_s``, fp32) plus the optimizer
state it owns (AdamW: two fp32 tensors per element) plus DeepSpeed's separate fp32 master partitions. The
ratio column compares the largest rank with the ideal ``total / W``. Step times on a 2-core machine are only
comparable between engines at the same W (W = 4 oversubscribes the cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boft_plugin.runtime.launchers import cpu_env, launch, torchrun_cmd  # noqa: E402

WORKER = str(Path(__file__).with_name("shard_worker.py"))


def launch_engine(engine: str, world: int, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        args = [WORKER, "--engine", engine, "--out", out, *extra]
        cmd = [sys.executable, *args] if engine == "single" else torchrun_cmd(args, nproc_per_node=world)
        launch(cmd, timeout=900, env=cpu_env()).check(f"{engine} W={world}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def rank_bytes(row: dict) -> int:
    return 4 * row["adapter_params_local"] + row["optimizer_state_bytes"] + row["master_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--engines", nargs="+", default=["ddp", "zero2", "zero3", "fsdp2"])
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_sharding.json"))
    parser.add_argument("--from-json", type=Path, help="only print the table of an earlier run")
    args, extra = parser.parse_known_args()
    if args.from_json:
        print_table(json.loads(args.from_json.read_text()))
        return

    results = []
    for world in args.worlds:
        for engine in (["single"] if world == 1 else []) + args.engines:
            rows = launch_engine(engine, world, extra)
            results.extend(rows)
            print(f"done {engine} W={world}", file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))

    print_table(results)


def print_table(results: list[dict]) -> None:
    single = next(r for r in results if r["engine"] == "single")
    print(
        f"Adapter: {single['adapter_params_total']:,} trainable parameters; a plain process with torch AdamW holds "
        f"{rank_bytes(single) / 2**20:.2f} MiB of adapter + optimizer state.\n"
    )
    print("'total' = what the same engine holds on one rank at W = 1 (DeepSpeed adds an fp32 master copy).\n")
    print("| engine | W | largest rank MiB | engine total / W MiB | largest / (total/W) | whole blocks | step ms |")
    print("|---|---|---|---|---|---|---|")
    for world in sorted({r["world"] for r in results}):
        for engine in dict.fromkeys(r["engine"] for r in results if r["world"] == world):
            rows = [r for r in results if r["world"] == world and r["engine"] == engine]
            own = [r for r in results if r["world"] == 1 and r["engine"] == engine] or [single]
            ideal = rank_bytes(own[0]) / world
            largest = max(rank_bytes(r) for r in rows)
            step = max(r["step_ms"] for r in rows)
            whole = all(r["whole_blocks"] for r in rows)
            print(
                f"| {engine} | {world} | {largest / 2**20:.3f} | {ideal / 2**20:.3f} | {largest / ideal:.2f}x | "
                f"{whole} | {step:.0f} |"
            )


if __name__ == "__main__":
    main()
