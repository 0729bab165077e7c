"""Where the time goes in one adapted linear layer: torch.profiler top ops by self CPU time.

    python benchmarks/profile_layer.py [--width 4096] [--tokens 2048] [--block-sizes 8 16] [--factors 1 2 4]
                                       [--lora] [--steps 2] [--top 12] [--threads N]

Profiles forward + backward of our BOFT layer (through ``register()`` + ``get_peft_model``) for each (b, m), and
optionally the parameter-matched LoRA, after one warm-up step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.common import Device, set_threads  # noqa: E402
from benchmarks.harness import RunOptions  # noqa: E402
from benchmarks.layer_bench import LayerCase, _builder  # noqa: E402
from benchmarks.methods import Method, boft_params, matched_lora_rank  # noqa: E402


def profile_method(case: LayerCase, method: Method, steps: int, top: int) -> str:
    opts = RunOptions(Device("cpu", torch.float32), warmup=1, repeats=steps, stock_budget_s=0)
    with method.context():
        torch.manual_seed(0)
        workload = _builder(case, opts)(method)
        workload.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                workload.step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) / steps / 1e3
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    return f"#### {method.label}, {case.title}: {total:,.1f} ms self CPU per step\n\n```\n{table}```\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--out-features", type=int, default=None, help="default: --width")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lora", action="store_true", help="also profile the parameter-matched LoRA")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    set_threads(args.threads)
    out_features = args.out_features or args.width
    for b in args.block_sizes:
        case = LayerCase(args.width, out_features, args.tokens, b)
        for m in args.factors:
            print(profile_method(case, Method("ours", m=m), args.steps, args.top), flush=True)
            if args.lora:
                r = matched_lora_rank(boft_params(args.width, out_features, b, m), args.width + out_features)
                lora = Method("lora", m=m, r=r, matched_params=boft_params(args.width, out_features, b, m))
                print(profile_method(case, lora, args.steps, args.top), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
