"""The one builder of a recipe's model, tokenizer and PEFT config, used by the CLI, the examples and the tests.

Validation that needs no weights runs first (``train.prepare``: data, model source, tokenizer,
``geometry_check.check_geometry`` on the meta device); :func:`build` then loads the model on every rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import RecipeError
from .model_source import load_tokenizer, model_source, write_config_model


@dataclass
class Built:
    """What :func:`build` returns.

    ``model`` is a plain transformers model and ``peft_config`` the ``BOFTConfig`` to hand to the trainer (TRL wraps
    it), or, with ``init_adapter`` or ``fsdp2_pre_shard``, ``model`` is already a ``PeftModel`` and ``peft_config``
    is None.
    """

    model: Any
    tokenizer: Any
    peft_config: Any
    base_model_path: str


def _model_init_kwargs(recipe) -> dict:
    """TRL's scripts' model kwargs: revision, trust_remote_code, attn_implementation, dtype, + model_init_kwargs."""
    model, training = recipe.model, recipe.training
    kwargs = {
        "revision": model.model_revision,
        "trust_remote_code": training.trust_remote_code,
        "attn_implementation": model.attn_implementation,
        "dtype": model.dtype,
    }
    extra = training.model_init_kwargs
    if isinstance(extra, str):
        extra = json.loads(extra)
    kwargs.update(extra or {})
    return {k: v for k, v in kwargs.items() if v is not None}


def is_zero3(training) -> bool:
    plugin = getattr(training, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return True
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def build(recipe, tokenizer=None) -> Built:
    """Build the recipe's model, tokenizer and PEFT config (registers boft_plugin's tuner with PEFT first).

    Call on every rank. Validation that needs no weights should have run already (see
    :func:`boft_plugin.recipes.train.prepare`); the tuner checks its targets again when it adapts the model.
    """
    from ..distributed.gather import barrier, rank
    from ..registry import register

    register()
    source = model_source(recipe)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe, source)
    if source.kind == "config":
        if rank() == 0:
            write_config_model(recipe, source, tokenizer)
        barrier()
    from transformers import AutoModelForCausalLM

    kwargs = _model_init_kwargs(recipe)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot load the model from {source.path!r}: {err}") from err

    options = recipe.options
    if options.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            model, options.init_adapter, is_trainable=True, autocast_adapter_dtype=not is_zero3(recipe.training)
        )
        peft_config = None
    else:
        peft_config = recipe.boft.to_peft_config()
    if options.fsdp2_pre_shard:
        model, peft_config = _shard_for_fsdp2(recipe, model, peft_config), None
    return Built(model=model, tokenizer=tokenizer, peft_config=peft_config, base_model_path=source.path)


def _shard_for_fsdp2(recipe, model, peft_config):
    """FSDP2 without accelerate's FSDP plugin (the CPU route, docs/trl.md): adapter(s) first, then shard.

    DPO's reference adapter is added here too (an adapter added after sharding would not be managed by FSDP2); the
    DPO trainer then keeps it instead of adding its own. accelerate is told the model is already prepared, so the
    Trainer does not wrap it in DDP (which cannot hold DTensor parameters) nor in autocast: with ``bf16`` / ``fp16``
    FSDP2's own mixed precision computes in that dtype (``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=
    float32)``) while the sharded parameters, the optimizer and every export stay float32.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ..distributed.fsdp import shard_for_fsdp2

    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if recipe.task == "dpo":  # TRL adds a "ref" adapter to any PeftModel it is given
        from .dpo_reference import add_reference_adapter

        add_reference_adapter(model)
    training = recipe.training
    compute = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    shard_for_fsdp2(model, mp_policy=policy)
    model._is_accelerate_prepared = True  # accelerate's own marker: prepare_model returns such a model as it is
    return model
