"""The one builder of a recipe's model, tokenizer and PEFT config, used by the CLI, the examples and the tests.

Validation that needs no weights runs first (``train.prepare``: data, model source, tokenizer,
``geometry_check.check_geometry`` on the meta device); :func:`build` then loads the model on every rank.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..runtime.ranks import log
from .model_source import write_config_model

if TYPE_CHECKING:
    from .parsing import Recipe
    from .plan import RunPlan


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


def build(plan: RunPlan | Recipe) -> Built:
    """Build the plan's model for this rank (registers boft_plugin's tuner with PEFT first).

    Call on every rank, with the :class:`~boft_plugin.recipes.plan.RunPlan` of ``prepare(recipe)`` (a recipe is
    prepared first). The tuner checks its targets again when it adapts the model. No rank ever holds the whole base
    model when the sharding engine can avoid it: under FSDP2 pre-sharding and DeepSpeed ZeRO-3, a local safetensors
    checkpoint is read slice by slice into each rank's shards (``distributed.fsdp_loading``,
    ``distributed.zero3_loading``).
    """
    from ..runtime.ranks import barrier, rank
    from ..tuner.registry import register
    from .plan import RunPlan, prepare

    if not isinstance(plan, RunPlan):
        plan = prepare(plan)
    register()
    recipe, source, tokenizer = plan.recipe, plan.source, plan.tokenizer
    if source.kind == "config":
        if rank() == 0:
            write_config_model(recipe, source, tokenizer)
        barrier()
    options = recipe.options
    if plan.engine == "fsdp2" and options.fsdp2_pre_shard and has_safetensors(source.path):
        model = _build_fsdp2_from_shards(plan)
        return Built(model=model, tokenizer=tokenizer, peft_config=None, base_model_path=source.path)

    model = _load_base_model(plan)
    if options.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            model, options.init_adapter, is_trainable=True, autocast_adapter_dtype=plan.engine != "zero3"
        )
        peft_config = None
    else:
        peft_config = plan.peft_config
    if options.fsdp2_pre_shard:  # a hub model: loaded whole, then sharded
        model, peft_config = _shard_for_fsdp2(recipe, model, peft_config), None
    return Built(model=model, tokenizer=tokenizer, peft_config=peft_config, base_model_path=source.path)


def has_safetensors(path: str) -> bool:
    """Whether ``path`` is a local checkpoint directory with safetensors weights (readable slice by slice)."""
    return os.path.isfile(os.path.join(path, "model.safetensors")) or os.path.isfile(
        os.path.join(path, "model.safetensors.index.json")
    )


def _torch_dtype(recipe, model_config):
    import torch

    dtype = _model_init_kwargs(recipe).get("dtype")
    if dtype in (None, "auto"):
        dtype = getattr(model_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _empty_model(plan: RunPlan, device: str | None = None):
    """The model of ``path``'s config without loading weights (on ``device``, or under ZeRO-3's ``zero.Init``)."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    recipe, config, path = plan.recipe, plan.model_config, plan.source.path
    kwargs = {"dtype": _torch_dtype(recipe, config)}
    attention = _model_init_kwargs(recipe).get("attn_implementation")
    if attention:
        kwargs["attn_implementation"] = attention
    placement = torch.device(device) if device else contextlib.nullcontext()
    with placement, no_init_weights():  # every weight is read from the checkpoint next
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.training.trust_remote_code, **kwargs)
    model.tie_weights()  # skipped under no_init_weights: an untied lm_head would be missing from a tied checkpoint
    model.name_or_path = model.config._name_or_path = path  # what the exported adapter names as its base
    return model


def _load_base_model(plan: RunPlan):
    """``from_pretrained``, or under ZeRO-3 an empty partitioned model filled partition by partition."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    recipe, path = plan.recipe, plan.source.path
    if plan.engine == "zero3" and has_safetensors(path):
        from ..distributed.zero3_loading import empty_zero3_model, load_zero3_partitions
        from .model_source import causal_lm_class

        config = plan.model_config
        model = empty_zero3_model(causal_lm_class(config), config, _torch_dtype(recipe, config))
        if model is None:
            model = _empty_model(plan)  # transformers builds it under zero.Init: already partitioned
        model.name_or_path = model.config._name_or_path = path
        report = load_zero3_partitions(model, path)
        if report is None:
            log(
                f"ZeRO-3: {path} needs transformers' key conversions; loading it with from_pretrained under zero.Init",
                every_rank=True,
            )
        else:
            log(
                f"ZeRO-3: {report['tensors']} tensors read partition by partition from {path} "
                f"({report['local_gib']:.2f} GiB on this rank, {report['seconds']:.1f} s)",
                every_rank=True,
            )
            if os.path.isfile(os.path.join(path, "generation_config.json")):
                model.generation_config = GenerationConfig.from_pretrained(path)
            return model.eval()  # as from_pretrained returns it
    try:
        return AutoModelForCausalLM.from_pretrained(path, **_model_init_kwargs(recipe))
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot load the model from {path!r}: {err}") from err


def _build_fsdp2_from_shards(plan: RunPlan):
    """FSDP2 pre-sharding without a full copy anywhere: meta model -> adapter(s) -> shard -> each rank's slices."""
    from peft import get_peft_model

    from ..distributed.fsdp_loading import copy_adapter_shards, load_adapter_shards, load_sharded_base_weights
    from .dpo_reference import REFERENCE_ADAPTER

    recipe, path = plan.recipe, plan.source.path
    model = _empty_model(plan, device="meta")
    peft_config = copy.copy(plan.peft_config)
    peft_config.inference_mode = False  # an init_adapter's saved config says inference
    model = get_peft_model(model, peft_config)
    if recipe.task == "dpo":  # TRL adds a "ref" adapter to any PeftModel it is given; FSDP2 needs it now
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    model = _shard_for_fsdp2(recipe, model, None)
    report = load_sharded_base_weights(model, path)  # also initialises the adapters as their config says
    log(
        f"FSDP2: {len(report.loaded)} tensors read shard by shard from {path} "
        f"({report.local_bytes / 2**30:.2f} GiB on this rank, {report.seconds:.1f} s)",
        every_rank=True,
    )
    if recipe.options.init_adapter:
        from ..export.loading import read_adapter

        load_adapter_shards(model, read_adapter(recipe.options.init_adapter).tensors)
    if recipe.task == "dpo":
        copy_adapter_shards(model, "default", REFERENCE_ADAPTER)
    return model


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
    if recipe.task == "dpo" and "ref" not in model.peft_config:  # TRL adds a "ref" adapter to any PeftModel
        from .dpo_reference import add_reference_adapter

        add_reference_adapter(model)
    training = recipe.training
    compute = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    shard_for_fsdp2(model, mp_policy=policy)
    model._is_accelerate_prepared = True  # accelerate's own marker: prepare_model returns such a model as it is
    return model
