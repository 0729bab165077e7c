"""The one builder of a recipe's model, used by the CLI, the examples and the tests.

Validation that needs no weights runs first (:func:`.plan.prepare`); :func:`build` then asks the plan's engine
(``boft_plugin.distributed``: one process or DDP, DeepSpeed ZeRO, FSDP2) for this rank's base model and adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..distributed.engine import AdapterRequest, BaseModelSpec
from ..errors import RecipeError
from .model_source import causal_lm_class, write_config_model
from .quantisation import quantisation_config

if TYPE_CHECKING:
    from .parsing import Recipe
    from .plan import RunPlan

__all__ = ["Built", "base_model_spec", "build"]


@dataclass
class Built:
    """What :func:`build` returns.

    ``model`` is a plain transformers model and ``peft_config`` the ``BOFTConfig`` to hand to the trainer (TRL wraps
    it), or, with ``init_adapter`` or an engine that shards first (FSDP2), ``model`` is already a ``PeftModel`` and
    ``peft_config`` is None. ``engine`` is the plan's engine object (the trainer's hooks use it).
    """

    model: Any
    tokenizer: Any
    peft_config: Any
    base_model_path: str
    engine: Any = None


def _from_pretrained_kwargs(recipe) -> dict:
    """TRL's scripts' model kwargs: revision, attn_implementation, dtype, quantization_config, + model_init_kwargs."""
    model, training = recipe.model, recipe.training
    kwargs = {
        "revision": model.model_revision,
        "attn_implementation": model.attn_implementation,
        "dtype": model.dtype,
        "quantization_config": quantisation_config(model),
    }
    extra = training.model_init_kwargs
    if isinstance(extra, str):
        extra = json.loads(extra)
    kwargs.update(extra or {})
    kwargs.pop("trust_remote_code", None)  # a field of its own in the spec
    return {k: v for k, v in kwargs.items() if v is not None}


def _torch_dtype(kwargs: dict, model_config):
    import torch

    dtype = kwargs.get("dtype")
    if dtype in (None, "auto"):
        dtype = getattr(model_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def base_model_spec(plan: RunPlan) -> BaseModelSpec:
    """What the engine builds: the plan's checkpoint, config, class and loading options."""
    kwargs = _from_pretrained_kwargs(plan.recipe)
    return BaseModelSpec(
        path=plan.source.path,
        config=plan.model_config,
        model_class=causal_lm_class(plan.model_config),
        dtype=_torch_dtype(kwargs, plan.model_config),
        from_pretrained_kwargs=kwargs,
        trust_remote_code=plan.recipe.training.trust_remote_code,
    )


def _adapter_request(plan: RunPlan, engine) -> AdapterRequest:
    from .dpo_reference import REFERENCE_ADAPTER, uses_reference_adapter

    init = plan.recipe.options.init_adapter

    def read_init_tensors() -> dict:
        from ..export.loading import read_adapter

        return read_adapter(init).tensors

    # TRL adds DPO's / KTO's (GRPO's / RLOO's with beta != 0) reference adapter to any PeftModel it is given; an
    # engine that shards first needs it now
    needs_reference = uses_reference_adapter(plan.recipe) and engine.shards_model
    reference = REFERENCE_ADAPTER if needs_reference else None
    return AdapterRequest(plan.peft_config, init, read_init_tensors if init else None, reference)


def build(plan: RunPlan | Recipe) -> Built:
    """Build the plan's model for this rank (registers boft_plugin's tuner with PEFT first).

    Call on every rank, with the :class:`~boft_plugin.recipes.plan.RunPlan` of ``prepare(recipe)`` (a recipe is
    prepared first). No rank ever holds the whole base model when the engine can avoid it: under FSDP2 and DeepSpeed
    ZeRO-3 a local safetensors checkpoint is read slice by slice into each rank's shards, on its device.
    """
    from ..runtime.ranks import barrier, rank
    from ..tuner.registry import register
    from .plan import RunPlan, prepare

    if not isinstance(plan, RunPlan):
        plan = prepare(plan)
    register()
    if plan.source.kind == "config":
        if rank() == 0:
            write_config_model(plan.recipe, plan.source, plan.tokenizer)
        barrier()
    engine = plan.engine_object()
    try:
        model = engine.load_base(base_model_spec(plan))
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot load the model from {plan.source.path!r}: {err}") from err
    model, peft_config = engine.adapt(model, _adapter_request(plan, engine))
    return Built(model, plan.tokenizer, peft_config, plan.source.path, engine)
