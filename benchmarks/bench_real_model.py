"""Whole training step on a real pretrained model and a wider Llama: ours BOFT vs matched LoRA, base and stock PEFT.

    python benchmarks/bench_real_model.py [--models smollm2 wide] [--threads 1 2] [--repeats 7] [--warmup 1]
        [--factors 1 2 4] [--no-stock] [--compile] [--layers] [--layer-tokens 256 2048] [--device cpu|cuda]
        [--json PATH]

Rows per model and thread count: the frozen base, LoRA with r matched to BOFT's trainable parameters (one per m),
ours (boft-plugin through ``register()`` + ``get_peft_model``) with m = 1, 2, 4, and stock PEFT BOFT m = 1 as it runs
without its CUDA extension (``stock_peft_boft(multi_factor=False)``). Repeats are interleaved across the methods
(round-robin), >= 7 by default; every ratio is computed from the raw medians of the same run, with the range of the
per-round paired ratios. On the CPU the tables use process CPU time (``time.process_time``: robust to other
processes on a shared machine, exact work measure with 1 thread) and show wall time next to it; on CUDA, CUDA events
(bf16). Memory is measured, never computed from shapes: peak RSS during one extra step minus RSS before it (CUDA:
``torch.cuda.max_memory_allocated``), and the bytes autograd saves during the forward. Host-synchronising ops are
counted at the dispatcher (``boft_plugin.testing.host_syncs``) for one forward + backward and one whole step.
``--compile`` adds the base, the matched LoRA and ours with every decoder layer compiled (``fullgraph=True``,
inductor), timed after the warm-up step that compiles them; ratios of compiled rows are to compiled LoRA.

``--layers`` adds one case per distinct adapted layer shape of the model (forward + backward of that layer alone,
``--layer-tokens`` tokens; with the first ``--threads`` value only), whose memory columns give the per-layer extra
memory of ours m = 1/2/4 over matched LoRA.
Markdown to stdout, progress to stderr, everything (each repeat, environment, load averages) to ``--json``.
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
from benchmarks.methods import StockEstimator  # noqa: E402
from benchmarks.real_model import RealCase, distinct_layer_shapes, run_layer, run_real_model  # noqa: E402
from benchmarks.real_report import extra_memory, layer_table, model_table, summary_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["smollm2", "wide"], default=["smollm2", "wide"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads, one run each")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per method, interleaved (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="discarded steps per method (default 1)")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4], help="butterfly factors m of ours")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-stock", action="store_true", help="leave out stock PEFT BOFT m=1")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also the base, matched LoRA and ours with every decoder layer torch.compile'd (fullgraph, inductor)",
    )
    p.add_argument(
        "--stock-budget-s",
        type=float,
        default=420.0,
        help="skip stock PEFT when its estimated time for all its steps is above this (default 420)",
    )
    p.add_argument("--layers", action="store_true", help="also run each distinct adapted layer shape alone")
    p.add_argument("--layer-tokens", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, default=Path("outputs") / "bench_real_model.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = select_device(args.device)
    metric = "median_ms" if device.is_cuda else "cpu_median_ms"
    meta = environment_info(device, args.threads[0]) | {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "threads_list": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "metric": metric,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    runs, layer_runs = [], []
    for threads in args.threads:
        set_threads(threads)
        estimator = StockEstimator(lambda: calibrate_gflops(device, cpu_time=metric == "cpu_median_ms"))
        opts = RunOptions(device, args.warmup, args.repeats, args.stock_budget_s, metric)
        for model in args.models:
            case = RealCase(model, seq=args.seq, batch=args.batch, block_size=args.block_size)
            log(f"[{threads} thread(s)] {case.title}")
            load = os.getloadavg()
            result = run_real_model(case, args.factors, opts, estimator, stock=not args.no_stock, compiled=args.compile)
            after = os.getloadavg()
            runs.append({"threads": threads, "loadavg_before": load, "loadavg_after": after, "result": result})
            if args.layers and threads == args.threads[0]:  # memory does not depend on the threads
                for in_f, out_f, names in distinct_layer_shapes(case):
                    for tokens in args.layer_tokens:
                        log(f"[{threads} thread(s)] layer {in_f}->{out_f} ({', '.join(names)}), {tokens} tokens")
                        layer = run_layer(
                            (in_f, out_f), tokens, args.block_size, args.factors, opts, estimator, not args.no_stock
                        )
                        layer |= {"model": model, "targets": names, "threads": threads}
                        layer["extra_memory_vs_lora"] = extra_memory(layer)
                        layer_runs.append(layer)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {"meta": meta, "runs": runs, "layers": layer_runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(render(results, device.is_cuda, args.models))
    log(f"wrote {args.json} ({meta['wall_s']:.0f} s)")
    return 0


def render(results: dict, cuda: bool, models: list[str]) -> str:
    meta = results["meta"]
    unit = "CUDA events, bf16" if cuda else "process CPU time of all threads (time.process_time), float32"
    out = [
        f"# Real-model training step ({meta['device']}, torch {meta['torch']}, peft {meta['peft']})",
        "",
        f"`{meta['command']}`; median of {meta['repeats']} interleaved steps after {meta['warmup']} warm-up "
        f"({unit}); load average at start {meta.get('loadavg_at_start')}, at end {meta['loadavg_at_end']}. "
        "Ratios: of the raw medians of the same run; in brackets, min–max of the per-round paired ratios.",
    ]
    for model in models:
        runs = [run for run in results["runs"] if run["result"]["case"]["model"] == model]
        if not runs:
            continue
        out += ["", f"## {runs[0]['result']['title']}", "", summary_table(results["runs"], model, cuda)]
        for run in runs:
            before = [round(x, 2) for x in run["loadavg_before"]]
            after = [round(x, 2) for x in run["loadavg_after"]]
            out += [
                "",
                f"### {run['threads']} thread(s) (load average {before} before, {after} after)",
                "",
                model_table(run["result"], meta["metric"], cuda),
            ]
    if results["layers"]:
        out += ["", "## Per adapted layer (forward + backward of the layer alone): time and measured memory"]
        for layer in results["layers"]:
            extra = "; ".join(
                f"{m}: ΔRSS {_x(v['rss_delta_bytes'])}, saved {_x(v['saved_bytes'])}"
                for m, v in layer["extra_memory_vs_lora"].items()
            )
            out += [
                "",
                f"### {layer['title']} ({', '.join(layer['targets'])}), {layer['threads']} thread(s)",
                "",
                layer_table(layer, meta["metric"]),
                "",
                f"Extra memory over the base, ours / matched LoRA: {extra}",
            ]
    return "\n".join(out)


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    raise SystemExit(main())
