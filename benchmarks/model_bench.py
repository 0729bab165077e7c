"""Level (b): a whole training step (forward + backward + AdamW step) of a small random-weight Llama.

Every linear layer of the decoder is adapted (q/k/v/o/gate/up/down; ``lm_head`` is not, as with PEFT's
``all-linear``). The frozen-base row has no optimizer step (nothing to train): it is forward + backward with the
embedding output requiring grad (``enable_input_require_grads``), i.e. the backward every adapter pays for.

The default intermediate size is 1408 (not Llama's 8/3 ratio 1376 = 32·43): down_proj's width must divide by
b·2^(m-1), which is 64 for b=8, m=4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .common import log
from .harness import RunOptions, Workload, run_case
from .methods import Method, StockEstimator, apply_method, boft_fits, model_methods, stock_extra_flops
from .report import add_ratios

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelCase:
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    seq: int = 256
    batch: int = 2
    block_size: int = 8

    @property
    def title(self) -> str:
        return (
            f"Llama training step (hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
            f"{self.heads} heads, vocab {self.vocab}, seq {self.seq}, batch {self.batch}), b={self.block_size}, "
            "all linear layers adapted"
        )

    def fields(self) -> dict:
        return {"level": "model", **asdict(self)}

    def build_base(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            vocab_size=self.vocab,
            max_position_embeddings=max(512, self.seq),
        )
        return LlamaForCausalLM(config)


def adapted_linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [
        (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile(fullgraph=True)`` of every decoder layer (regional: one graph serves all the layers).

    The layers share their code, so the graphs of every compared method count against one recompile limit.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        layer.compile(fullgraph=True)


def _builder(case: ModelCase, opts: RunOptions):
    device = opts.device

    def build(method: Method) -> Workload:
        model = case.build_base().to(device.torch_device, device.dtype)
        model.train()
        trainable = apply_method(method, model, case.block_size, TARGETS)
        if method.compiled:
            compile_decoder_layers(model)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen).to(device.torch_device)
        params = [p for p in trainable.parameters() if p.requires_grad]
        if method.kind == "base":
            model.enable_input_require_grads()
            optimizer = None
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-4)

        def finish(loss: torch.Tensor) -> None:
            loss.backward()
            if optimizer is not None:
                optimizer.step()

        def reset() -> None:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)

        return Workload(
            model=trainable,
            forward=lambda: trainable(input_ids=ids, labels=ids, use_cache=False).loss,
            finish=finish,
            reset=reset,
            exclude=[*trainable.parameters(), *trainable.buffers()],
        )

    return build


def run_model_case(case: ModelCase, factors: list[int], opts: RunOptions, estimator: StockEstimator) -> dict:
    shapes = adapted_linear_shapes(case.build_base())
    valid = [m for m in factors if all(boft_fits(i, case.block_size, m) for i, _ in shapes)]
    methods, lora_by_m = model_methods(shapes, case.block_size, valid)
    tokens = case.seq * case.batch
    log(f"  {case.title}")
    rows = run_case(
        methods,
        _builder(case, opts),
        opts,
        case.fields(),
        estimator,
        extra_flops=lambda method: sum(stock_extra_flops(i, tokens, method.m) for i, _ in shapes),
    )
    for m in sorted(set(factors) - set(valid)):
        for kind in ("ours", "stock"):
            method = Method(kind, m=m)
            rows.append(
                {**case.fields(), "method": method.key, "label": method.label, "kind": kind, "m": m}
                | {"status": "skipped", "note": "skipped (a layer width is not divisible by b·2^(m-1))"}
            )
    add_ratios(rows, lora_by_m, opts.metric)
    return {"case": case.fields(), "title": case.title, "rows": rows, "lora_by_m": lora_by_m}
