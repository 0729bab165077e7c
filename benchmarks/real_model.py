"""Cases and method lists of ``bench_real_model.py``: a real pretrained model and a wider config-built Llama.

* ``smollm2``: SmolLM2-135M-Instruct (hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads, vocab 49152,
  tied embeddings), the plain checkpoint :func:`boft_plugin.demo.smollm2.convert_smollm2` builds once from the registry
  package (no model hub).
* ``wide``: a random-weight Llama with TinyLlama-1.1B's widths (hidden 2048, intermediate 5632, 32 heads / 4 KV
  heads) and 4 layers; vocab 8192 so that the unadapted ``lm_head`` is ~9% of the step's matmul work, close to
  its share in a full-depth 22-layer 1.1B model (~6%), rather than the 27% a 32000-token head would take at 4 layers.

Whole training step as in ``model_bench.py``: forward + backward + AdamW on the adapter (the frozen base: forward +
backward with the embedding output requiring grad). Every decoder linear layer is adapted (q/k/v/o/gate/up/down).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .harness import RunOptions, run_case
from .layer_bench import LayerCase
from .layer_bench import _builder as layer_builder
from .methods import Method, StockEstimator, boft_fits, layer_methods, model_methods, stock_extra_flops
from .model_bench import TARGETS, adapted_linear_shapes
from .model_bench import _builder as model_builder
from .report import add_ratios

WIDE = dict(hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=4, vocab=8192)


@dataclass(frozen=True)
class RealCase:
    name: str  # "smollm2" | "wide"
    seq: int = 128
    batch: int = 2
    block_size: int = 8

    @property
    def vocab(self) -> int:
        return 49152 if self.name == "smollm2" else WIDE["vocab"]

    @property
    def title(self) -> str:
        if self.name == "smollm2":
            model = "SmolLM2-135M-Instruct (pretrained; hidden 576, intermediate 1536, 30 layers, vocab 49152)"
        else:
            w = WIDE
            model = (
                f"Llama, random weights (hidden {w['hidden']}, intermediate {w['intermediate']}, {w['layers']} "
                f"layers, {w['heads']} heads / {w['kv_heads']} KV heads, vocab {w['vocab']})"
            )
        return f"{model}, {self.batch}x{self.seq} tokens, b={self.block_size}, all decoder linear layers adapted"

    def fields(self) -> dict:
        return {"level": "model", "model": self.name, **asdict(self)}

    def build_base(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.name == "smollm2":
            from boft_plugin.demo.smollm2 import convert_smollm2

            return LlamaForCausalLM.from_pretrained(convert_smollm2(), dtype=torch.float32)
        w = WIDE
        config = LlamaConfig(
            hidden_size=w["hidden"],
            intermediate_size=w["intermediate"],
            num_hidden_layers=w["layers"],
            num_attention_heads=w["heads"],
            num_key_value_heads=w["kv_heads"],
            vocab_size=w["vocab"],
            max_position_embeddings=max(2048, self.seq),
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    def meta_base(self) -> nn.Module:
        """The same architecture on the meta device (shapes only)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.name == "smollm2":
            from boft_plugin.demo.smollm2 import convert_smollm2

            config = AutoConfig.from_pretrained(convert_smollm2())
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        with torch.device("meta"):
            return self.build_base()


def _keep(method: Method, stock: bool) -> bool:
    """The compared rows: frozen base, matched LoRA, ours m = 1/2/4, stock PEFT m = 1 (as it runs without CUDA)."""
    if method.kind == "oft":
        return False
    if method.kind == "stock":
        return stock and method.m == 1
    return True


def run_real_model(
    case: RealCase, factors: list[int], opts: RunOptions, estimator: StockEstimator, stock: bool, compiled: bool = False
):
    shapes = adapted_linear_shapes(case.meta_base())
    valid = [m for m in factors if all(boft_fits(i, case.block_size, m) for i, _ in shapes)]
    methods, lora_by_m = model_methods(shapes, case.block_size, valid, compiled=compiled)
    methods = [method for method in methods if _keep(method, stock) and (method.kind != "ours" or method.m in valid)]
    tokens = case.seq * case.batch
    rows = run_case(
        methods,
        model_builder(case, opts),
        opts,
        case.fields(),
        estimator,
        extra_flops=lambda method: sum(stock_extra_flops(i, tokens, method.m) for i, _ in shapes),
    )
    add_ratios(rows, lora_by_m, opts.metric)
    return {"case": case.fields(), "title": case.title, "rows": rows, "lora_by_m": lora_by_m, "n_layers": len(shapes)}


def distinct_layer_shapes(case: RealCase) -> list[tuple[int, int, list[str]]]:
    """``(in, out, [target names])`` of the model's distinct adapted layer shapes."""
    model = case.meta_base()
    seen: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and short in TARGETS:
            names = seen.setdefault((module.in_features, module.out_features), [])
            if short not in names:
                names.append(short)
    return [(i, o, names) for (i, o), names in seen.items()]


def run_layer(
    shape: tuple[int, int],
    tokens: int,
    block_size: int,
    factors: list[int],
    opts: RunOptions,
    estimator: StockEstimator,
    stock: bool,
) -> dict:
    case = LayerCase(shape[0], shape[1], tokens, block_size)
    valid = [m for m in factors if boft_fits(case.in_features, block_size, m)]
    methods, lora_by_m = layer_methods(case.in_features, case.out_features, block_size, valid)
    methods = [method for method in methods if _keep(method, stock) and (method.kind != "ours" or method.m in valid)]
    rows = run_case(
        methods,
        layer_builder(case, opts),
        opts,
        case.fields(),
        estimator,
        extra_flops=lambda method: stock_extra_flops(case.in_features, tokens, method.m),
    )
    add_ratios(rows, lora_by_m, opts.metric)
    return {"case": case.fields(), "title": case.title, "rows": rows, "lora_by_m": lora_by_m}
