"""Merge on a quantised base: how far the merged model is from the unmerged adapter, next to one quantisation.

    python benchmarks/bench_quantised_merge.py                   # SmolLM2-135M-Instruct (the main job's model)
    python benchmarks/bench_quantised_merge.py --model tiny      # the tests' random tiny Llama

For each bitsandbytes layout (NF4, NF4 + double quantisation + bf16 storage, FP4, 8-bit): the base loaded quantised
from its float32 checkpoint, a random BOFT adapter (b = 8, m = 2, on q/v/down projections, ``init_weights=False``,
``boft_R`` multiplied by each ``--scales`` value; 1 changes a real model's logits completely) added by boft-plugin
and the same adapter by stock PEFT (``boft_plugin.stock_peft``). Printed, as relative errors of the logits on one
batch (``||a - b|| / ||b||``, eval mode): the base's own quantisation error (quantised vs float32 base), the
adapter's effect, ours unmerged vs stock unmerged, merged vs unmerged (ours and stock), ours merged vs stock
merged; and per layer, the largest ratio of the merged weight's error (against ``W B^T s`` of the dequantised
weight) to the layer's own quantisation error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(base_dir: Path, mode: str, ids, full_logits, full_weights: dict, targets: list[str], scale: float) -> dict:
    import torch
    from peft import BOFTConfig, get_peft_model

    import boft_plugin
    from boft_plugin.stock_peft import stock_peft_boft
    from boft_plugin.testing.quantised import load_quantised
    from boft_plugin.tuner.layer import BoftLayer

    config = dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=targets, init_weights=False)
    torch.manual_seed(0)
    with stock_peft_boft(multi_factor=True):
        stock = get_peft_model(load_quantised(base_dir, mode), BOFTConfig(**config))
        with torch.no_grad():  # smaller rotations than PEFT's init_weights=False draws (a trained-adapter regime)
            for name, param in stock.named_parameters():
                if "boft_R" in name:
                    param.mul_(scale)
        adapters = {k: v.detach().clone() for k, v in stock.state_dict().items() if "boft_" in k}
    boft_plugin.register()
    try:
        ours = get_peft_model(load_quantised(base_dir, mode), BOFTConfig(**config))
    finally:
        boft_plugin.unregister()
    ours.load_state_dict(adapters, strict=False)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, BoftLayer)}
    ratios = []
    exact = {}
    for name, layer in layers.items():
        loaded = layer.get_base_weight().float()
        key = name.split("base_model.model.", 1)[1] + ".weight"
        base_error = rel(loaded, full_weights[key])
        delta, scale = layer.get_delta_weight("default")
        exact[name] = ((loaded @ delta.T) * scale.reshape(-1, 1), base_error)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ours.disable_adapter():
            base_logits = ours(input_ids=ids).logits
        unmerged = ours(input_ids=ids).logits
        with stock_peft_boft(multi_factor=True):
            stock_unmerged = stock(input_ids=ids).logits
            stock.merge_adapter()
            stock_merged = stock(input_ids=ids).logits
        ours.merge_adapter()
        merged = ours(input_ids=ids).logits
    for name, layer in layers.items():
        weight, base_error = exact[name]
        ratios.append(rel(layer.get_base_weight(), weight) / base_error)
    return {
        "mode": mode,
        "base_quantisation_error": rel(base_logits, full_logits),
        "adapter_effect": rel(unmerged, base_logits),
        "ours_vs_stock_unmerged": rel(unmerged, stock_unmerged),
        "merged_vs_unmerged": rel(merged, unmerged),
        "stock_merged_vs_unmerged": rel(stock_merged, stock_unmerged),
        "ours_vs_stock_merged": rel(merged, stock_merged),
        "worst_layer_ratio": max(ratios),
        "layers": len(layers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--scales", nargs="+", type=float, default=[1.0, 0.1], help="boft_R multiplied by each (1: PEFT's random init)"
    )
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from boft_plugin.testing.quantised import QUANT_MODES, bitsandbytes_missing, save_tiny_llama

    if bitsandbytes_missing():
        print(bitsandbytes_missing(), file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        from boft_plugin.demo.smollm2 import convert_smollm2

        base_dir = convert_smollm2()
    else:
        base_dir = save_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama")
    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    vocab = full.config.vocab_size
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_logits = full(input_ids=ids).logits
    full_weights = {k: v.detach() for k, v in full.named_parameters()}
    targets = ["q_proj", "v_proj", "down_proj"]
    rows = []
    for scale in args.scales:
        for mode in QUANT_MODES:
            rows.append({"scale": scale, **measure(base_dir, mode, ids, full_logits, full_weights, targets, scale)})
    del full
    print(f"{args.model}: BOFT b=8 m=2 on {', '.join(targets)}, random adapters; relative logits errors")
    columns = [
        "scale",
        "mode",
        "base_quantisation_error",
        "adapter_effect",
        "ours_vs_stock_unmerged",
        "merged_vs_unmerged",
        "stock_merged_vs_unmerged",
        "ours_vs_stock_merged",
        "worst_layer_ratio",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) if c in ("mode", "scale") else f"{row[c]:.2e}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
