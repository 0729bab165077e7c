"""BOFT -> LoRA conversion of a trained adapter: rank vs the error it costs, on the layers and on the whole model.

    python -m boft_plugin.demo.main_job --workdir outputs/main_job        # once: the trained SmolLM2 adapters
    python benchmarks/bench_lora_conversion.py --adapter outputs/main_job/sft --ranks 8 16 64 128 256 512 \
        --max-errors 0.5 0.2 0.1

Each row is one ``boft_plugin.convert_to_lora`` (``boft-plugin convert --to-lora``) of ``--adapter``: the ranks
written, the relative Frobenius error of the layers' weight deltas (max and mean), the smallest share of a delta's
energy kept, the LoRA adapter's size (values, and as a share of the merged model's adapted weights), and the probe
(``--prompt-file`` or the run's ``probe_logits.pt`` input): logit error and per-token KL of stock PEFT's LoRA model
against the BOFT model, beside the KL by which the adapter moves the base at all. Prints a markdown table and
writes the rows as JSON (``--json``). ``--memory RANK`` instead measures peak RssAnon of the streamed conversion
against importing the libraries and against loading the whole base model, each in its own process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def row(label: str, report, seconds: float) -> dict:
    data = report.as_dict()
    adapted = sum(layer.shape[0] * layer.shape[1] for layer in report.layers)
    probe = data["probe"] or {}
    return {
        "setting": label,
        "ranks": f"{min(data['ranks'])}-{max(data['ranks'])}" if len(data["ranks"]) > 1 else str(data["ranks"][0]),
        "max_err": data["max_relative_error"],
        "mean_err": data["mean_relative_error"],
        "min_energy": data["min_energy_kept"],
        "lora_values": data["lora_values"],
        "vs_adapted_weights": data["lora_values"] / adapted,
        "logit_err": probe.get("logit_rel_err"),
        "kl_mean": probe.get("kl_mean"),
        "kl_max": probe.get("kl_max"),
        "adapter_kl": probe.get("adapter_kl_mean"),
        "seconds": seconds,
    }


def peak_rss_anon_mib(cmd: list[str]) -> float:
    """Peak RssAnon of a child process (sampled every 20 ms from /proc), MiB; raises if the command fails."""
    import subprocess

    from boft_plugin.runtime.process_memory import rss_anon_bytes

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon_bytes(proc.pid) or 0)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    return peak / 2**20


def memory_rows(adapter: str, rank: int) -> list[tuple[str, float]]:
    """Peak RssAnon of: importing torch + transformers + boft-plugin; the streamed conversion (no probe); loading
    the whole base model in float32 (what the probe, verify or a non-streaming converter would hold)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        imports = "import torch, transformers, peft, boft_plugin.export.lora_convert"
        load = f"{imports}; transformers.AutoModelForCausalLM.from_pretrained({config['base_model_name_or_path']!r})"
        convert = [sys.executable, "-m", "boft_plugin", "convert", "--to-lora", adapter, f"{tmp}/lora", "--no-probe"]
        return [
            ("imports only", peak_rss_anon_mib([sys.executable, "-c", imports])),
            (
                f"convert --to-lora --rank {rank} --no-probe",
                peak_rss_anon_mib([*convert, "--rank", str(rank)]),
            ),
            # safetensors maps the file: a loaded model's weights are file-backed pages, not RssAnon
            (
                "from_pretrained of the whole base (float32, memory-mapped)",
                peak_rss_anon_mib([sys.executable, "-c", load]),
            ),
        ]


def main(argv: list[str] | None = None) -> int:
    from boft_plugin.errors import LoraBudgetError
    from boft_plugin.export import convert_to_lora

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a BOFT adapter directory (a run's output_dir)")
    parser.add_argument("--base_model", default=None)
    parser.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 64, 128, 256, 512])
    parser.add_argument("--max-errors", type=float, nargs="*", default=[0.5, 0.2, 0.1])
    parser.add_argument("--server-ranks", default="vllm", help="snap budget ranks to this server's ranks ('' = no)")
    parser.add_argument("--prompt-file", default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--memory", type=int, default=None, metavar="RANK", help="only the peak-memory table")
    args = parser.parse_args(argv)
    if args.memory is not None:
        base = Path(json.loads((Path(args.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"])
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
        print(f"base checkpoint: {size:.0f} MiB of safetensors\n")
        print("| process | peak RssAnon MiB |\n|---|---|")
        for label, mib in memory_rows(args.adapter, args.memory):
            print(f"| {label} | {mib:.0f} |")
        return 0
    settings = [(f"rank {r}", {"rank": r}) for r in args.ranks]
    settings += [
        (
            f"max_error {e}" + (f", {args.server_ranks} ranks" if args.server_ranks else ""),
            {"max_error": e, "ranks": args.server_ranks or None},
        )
        for e in args.max_errors
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, options) in enumerate(settings):
            started = time.perf_counter()
            try:
                report = convert_to_lora(
                    args.adapter,
                    Path(tmp) / str(index),
                    base_model=args.base_model,
                    prompt_file=args.prompt_file,
                    **options,
                )
            except LoraBudgetError as err:  # a row of its own: the budget is missed, nothing was written
                missed = row(label, err.report, time.perf_counter() - started)
                rows.append({**missed, "over_budget": err.report.failing})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                continue
            rows.append(row(label, report, time.perf_counter() - started))
            layers, probe = len(report.layers), report.probe
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{args.adapter}: {layers} layers; probe: {probe['tokens']} tokens ({probe['input']})\n")
    print(
        "| setting | ranks | delta error max | mean | energy kept (min) | LoRA values | / adapted weights "
        "| logit error | KL mean | KL max | adapter's own KL | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "over_budget" in r:
            print(
                f"| {r['setting']} | {r['ranks']} | {r['max_err']:.3g} | {r['mean_err']:.3g} | {r['min_energy']:.4f} | "
                f"budget missed in {len(r['over_budget'])} layers: nothing written (exit 1) | | | | | | "
                f"{r['seconds']:.0f} |"
            )
            continue
        print(
            f"| {r['setting']} | {r['ranks']} | {r['max_err']:.3g} | {r['mean_err']:.3g} | {r['min_energy']:.4f} | "
            f"{r['lora_values'] / 1e6:.2f} M | {r['vs_adapted_weights']:.2f} | {r['logit_err']:.3g} | "
            f"{r['kl_mean']:.3g} | {r['kl_max']:.3g} | {r['adapter_kl']:.3g} | {r['seconds']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
