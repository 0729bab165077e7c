"""Benchmark boft-plugin against stock PEFT BOFT, LoRA, PEFT OFT and the frozen base, in one process.

    python benchmarks/bench_boft.py [--quick] [--json out.json] [--device cpu|cuda] [--threads N]

Two levels: (a) one adapted ``nn.Linear`` (forward + backward) over widths / MLP shapes, token counts, block
sizes b and butterfly factors m; (b) a whole training step (forward + backward + AdamW) of a small Llama with
all linear layers adapted. Per row: median step time over the repeats (after warm-up), ratios to the frozen base,
to the parameter-matched LoRA and to stock PEFT BOFT with the same m, peak RSS delta (CUDA: peak allocated), the
bytes autograd saved during the forward, and the trainable parameters. Markdown tables go to stdout, progress to
stderr, everything to the JSON file.

Stock PEFT rows run inside ``boft_plugin.stock_peft.stock_peft_boft``: m=1 is stock PEFT as it runs without its
CUDA extension (it silently uses one factor whatever m), m>1 is its real dense m-factor maths through the oracle
patch. Stock rows whose estimated time exceeds ``--stock-budget-s`` are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import calibrate_gflops, environment_info, log, select_device, set_threads  # noqa: E402
from benchmarks.harness import RunOptions  # noqa: E402
from benchmarks.layer_bench import LayerCase, run_layer_case  # noqa: E402
from benchmarks.methods import StockEstimator  # noqa: E402
from benchmarks.model_bench import ModelCase, run_model_case  # noqa: E402
from benchmarks.report import case_table  # noqa: E402

FULL_SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008), (11008, 4096)]
QUICK_SHAPES = [(1024, 1024), (2048, 2048)]


def _shape(text: str) -> tuple[int, int]:
    """``1024`` (square) or ``4096x11008`` (in x out)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"bad shape {text!r}; use 1024 or 4096x11008")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="representative subset (~2-3 min on 2 CPU cores)")
    p.add_argument("--json", type=Path, default=None, help="result file (default outputs/bench_boft[_quick].json)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all available cores)")
    p.add_argument("--levels", default="layer,model", help="comma list of: layer, model")
    p.add_argument("--shapes", type=_shape, nargs="+", help="layer shapes: 1024 or INxOUT (default per mode)")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per layer step (default 512 2048; quick 512)")
    p.add_argument("--block-sizes", type=int, nargs="+", help="BOFT/OFT block sizes (default 8 16 32; quick 8 16)")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4], help="butterfly factors m")
    p.add_argument("--model-block-size", type=int, default=8, help="b of the whole-model level")
    p.add_argument(
        "--metric",
        choices=["wall", "cpu"],
        default="wall",
        help="time in the tables and ratios: wall (default) or process CPU time (robust on a shared machine "
        "with --threads 1)",
    )
    p.add_argument("--warmup", type=int, help="discarded steps per method (default 2; quick 1)")
    p.add_argument("--repeats", type=int, help="timed steps per method (default 5; quick 3)")
    p.add_argument(
        "--stock-budget-s",
        type=float,
        help="skip a stock-PEFT row whose estimated total time (all its steps) is above this (default 90; quick 15)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.shapes = args.shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    args.tokens = args.tokens or ([512] if quick else [512, 2048])
    args.block_sizes = args.block_sizes or ([8, 16] if quick else [8, 16, 32])
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.repeats = args.repeats or (3 if quick else 5)
    args.stock_budget_s = args.stock_budget_s if args.stock_budget_s is not None else (15.0 if quick else 90.0)
    args.json = args.json or Path("outputs") / f"bench_boft{'_quick' if quick else ''}.json"
    args.levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    unknown = set(args.levels) - {"layer", "model"}
    if unknown:
        p.error(f"unknown levels: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = select_device(args.device)
    threads = set_threads(args.threads)
    metric = "cpu_median_ms" if args.metric == "cpu" else "median_ms"
    estimator = StockEstimator(lambda: calibrate_gflops(device, cpu_time=metric == "cpu_median_ms"))
    gflops = estimator.gflops
    opts = RunOptions(device, args.warmup, args.repeats, args.stock_budget_s, metric)
    meta = environment_info(device, threads) | {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "quick": args.quick,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "stock_budget_s": args.stock_budget_s,
        "metric": metric,
        "calibrated_matmul_gflops": round(gflops, 1),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(f"boft benchmark on {device.kind} ({meta['dtype']}), {threads} threads, matmul {gflops:.0f} GFLOP/s")

    results: dict = {"meta": meta, "layer": [], "model": []}
    if "layer" in args.levels:
        log("Level (a): one adapted linear layer, forward + backward")
        for in_f, out_f in args.shapes:
            for tokens in args.tokens:
                for b in args.block_sizes:
                    case = LayerCase(in_f, out_f, tokens, b)
                    results["layer"].append(run_layer_case(case, args.factors, opts, estimator))
    if "model" in args.levels:
        log("Level (b): whole-model training step")
        case = ModelCase(block_size=args.model_block_size)
        results["model"].append(run_model_case(case, args.factors, opts, estimator))

    meta["stock_estimate_ratios"] = [round(r, 3) for r in estimator.ratios]
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))

    print(render(results, device.is_cuda))
    log(f"wrote {args.json} ({meta['wall_s']:.0f} s)")
    return 0


def render(results: dict, cuda: bool) -> str:
    meta = results["meta"]
    if meta["metric"] == "cpu_median_ms":
        unit = "process CPU time of all threads, time.process_time"
    else:
        unit = "CUDA events" if cuda else "time.perf_counter"
    out = [
        f"# BOFT benchmark ({meta['device']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"peft {meta['peft']})",
        "",
        f"Median of {meta['repeats']} steps after {meta['warmup']} warm-up ({unit}), repeats interleaved across "
        "the methods of a case. × columns: time over the frozen base, over LoRA with matched trainable parameters, "
        "over stock PEFT BOFT with the same m. Peak ΔRSS: process peak RSS during one step minus RSS before it. "
        "Saved act.: bytes autograd saved in the forward (parameters excluded; the layer level also excludes the "
        "layer input). Other procs CPU: share of the machine's CPU used by other processes during a row's timed "
        "steps (high values: the row's time is inflated by contention).",
    ]
    shares = [
        row["other_cpu_share"]
        for level in ("layer", "model")
        for case in results[level]
        for row in case["rows"]
        if row.get("other_cpu_share") is not None
    ]
    if shares and sorted(shares)[len(shares) // 2] > 0.1:
        out += [
            "",
            f"**Warning:** other processes used a median {sorted(shares)[len(shares) // 2]:.0%} of the machine's CPU "
            f"during the timed steps (load average {meta.get('loadavg_at_start')} at start): wall times are "
            "inflated and noisy, small multi-op steps most of all.",
        ]
    for level, heading in (("layer", "Per adapted layer (forward + backward)"), ("model", "Whole model")):
        if not results[level]:
            continue
        out += ["", f"## {heading}"]
        for case in results[level]:
            out += ["", f"### {case['title']}", "", case_table(case["rows"], cuda, level == "model", meta["metric"])]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
