"""The one builder of a recipe's model, tokenizer and PEFT config, used by the CLI, the examples and the tests.

Model sources (exactly one; see ``docs/trl.md``):

- ``model_name_or_path``: a local directory or hub id, loaded with ``from_pretrained``;
- ``model_config`` (a mapping with ``model_type``) or ``tiny_model: true`` (a tiny Llama, ``model_config`` entries
  override it): random weights seeded by ``model_seed`` (default ``seed``). The main process writes this base model
  and its tokenizer to ``<output_dir>/base_model`` and every rank loads it from there with ``from_pretrained``, so
  DeepSpeed ZeRO-3's ``zero.Init`` works as for any checkpoint and the exported adapter names a base model that
  exists;
- none of them with ``init_adapter``: the adapter's ``base_model_name_or_path``.

:func:`check_recipe_model` validates the BOFT geometry against the model config's layer widths on the meta device
(no weights) before :func:`build` loads anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

from .args import BoftArguments
from .errors import RecipeError

BASE_MODEL_DIR = "base_model"


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


@dataclass
class ModelSource:
    kind: str  # "pretrained" or "config"
    path: str | None = None  # from_pretrained path (for "config": where the base model is written)
    config: Any = None  # a transformers PretrainedConfig for "config"


def _adapter_config(path: str) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as handle:
        return json.load(handle)


def model_source(recipe) -> ModelSource:
    """Where the base model comes from; raises :class:`RecipeError` for zero or several sources."""
    args, name = recipe.recipe, recipe.model.model_name_or_path
    given = [
        key
        for key, on in (
            ("model_name_or_path", name),
            ("model_config", args.model_config and not args.tiny_model),
            ("tiny_model", args.tiny_model),
        )
        if on
    ]
    if len(given) > 1:
        raise RecipeError(f"recipe keys {' and '.join(repr(k) for k in given)}: give exactly one model source")
    if name:
        return ModelSource("pretrained", path=name)
    if args.tiny_model or args.model_config:
        from transformers import AutoConfig

        from ..toy import tiny_llama_config

        overrides = dict(args.model_config or {})
        try:
            if args.tiny_model:
                overrides.pop("model_type", None)
                config = tiny_llama_config(**overrides)
            else:
                config = AutoConfig.for_model(**overrides)
        except (TypeError, ValueError, KeyError) as err:
            raise RecipeError(f"recipe key 'model_config': cannot build a model config ({err})") from err
        return ModelSource("config", path=os.path.join(recipe.training.output_dir, BASE_MODEL_DIR), config=config)
    if args.init_adapter:
        base = _adapter_config(args.init_adapter).get("base_model_name_or_path")
        if not base:
            raise RecipeError(
                f"recipe key 'init_adapter': {args.init_adapter}/adapter_config.json names no base model; set "
                "'model_name_or_path'"
            )
        return ModelSource("pretrained", path=base)
    raise RecipeError(
        "no model: set 'model_name_or_path' (a local directory or hub id), 'model_config' (a config mapping with "
        "model_type), 'tiny_model: true', or 'init_adapter'"
    )


def model_config_of(recipe, source: ModelSource | None = None):
    """The transformers config of the recipe's base model (reads config.json only)."""
    source = source or model_source(recipe)
    if source.kind == "config":
        return source.config
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.path, revision=recipe.model.model_revision, trust_remote_code=recipe.training.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'model_name_or_path': cannot read the config of {source.path!r}: {err}") from err


def adapter_peft_config(recipe):
    """The BOFTConfig the run trains: the recipe's ``boft_*`` keys, or the ``init_adapter``'s own config."""
    if not recipe.recipe.init_adapter:
        return recipe.boft.to_peft_config()
    from peft import PeftConfig

    changed = [
        f.name for f in fields(BoftArguments) if getattr(recipe.boft, f.name) != getattr(BoftArguments(), f.name)
    ]
    if changed:
        raise RecipeError(
            f"recipe key(s) {', '.join(repr(k) for k in changed)}: not used with 'init_adapter' (the adapter keeps its "
            "own BOFT configuration); remove them"
        )
    config = PeftConfig.from_pretrained(recipe.recipe.init_adapter)
    if getattr(config.peft_type, "value", config.peft_type) != "BOFT":
        raise RecipeError(
            f"recipe key 'init_adapter': {recipe.recipe.init_adapter} holds a {config.peft_type} adapter, not BOFT"
        )
    return config


def _meta_model(model_config):
    """The model on the meta device (no memory, no weights, outside any DeepSpeed ``zero.Init``)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    model_class = _get_model_class(model_config, AutoModelForCausalLM._model_mapping)
    with torch.device("meta"):
        return model_class(model_config)


def check_geometry(model_config, peft_config) -> int:
    """Check every module ``peft_config`` targets in a model of ``model_config`` (meta device, no weights).

    Returns the number of adapted modules; raises :class:`RecipeError` naming the recipe keys, the modules and
    their widths, with valid alternatives.
    """
    import copy

    from peft.tuners.boft.model import BOFTModel
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from ..tuner.geometry import GeometryError, resolve_geometry, suggest_valid_choices

    try:
        model = _meta_model(model_config)
    except Exception as err:  # noqa: BLE001 - unknown architectures: the tuner checks again when it adapts
        import warnings

        warnings.warn(f"BOFT geometry not checked before loading ({type(err).__name__}: {err})", stacklevel=2)
        return -1
    config = copy.copy(peft_config)
    if config.target_modules is None:  # PEFT's per-architecture default (as BOFTModel._prepare_adapter_config)
        from peft.utils import TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING as defaults

        default = defaults.get(getattr(model_config, "model_type", None))
        if default is None:
            raise RecipeError(
                f"recipe key 'boft_target_modules': PEFT has no default target modules for model type "
                f"{getattr(model_config, 'model_type', None)!r}; list them"
            )
        config.target_modules = default if isinstance(default, str) else set(default)
    config = _maybe_include_all_linear_layers(config, model)
    size, num, m = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
    problems, count = [], 0
    output_layer = model.get_output_embeddings()
    for key, module in model.named_modules():
        if not key:
            continue
        matched = BOFTModel._check_target_module_exists(config, key)
        if not matched or type(matched).__name__ == "_ExcludedModule":
            continue
        if module is output_layer and output_layer is not None:
            raise RecipeError(
                f"recipe key 'boft_target_modules' selects the output layer '{key}': TRL 1.16 computes "
                "log-probabilities from its weight directly, so an adapter there would never train; remove it (or "
                "train it in full with 'boft_modules_to_save')"
            )
        width = getattr(module, "in_features", None)
        if width is None:  # not a Linear (Conv1D, Conv2d, ...): left to the tuner's own check
            continue
        count += 1
        try:
            resolve_geometry(width, size, num, m)
        except GeometryError as err:
            problems.append(f"{key} (input width {width}): {err.reason}; {suggest_valid_choices(width, size, num, m)}")
    keys = "boft_block_size" if size else "boft_block_num"
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise RecipeError(
            f"recipe keys '{keys}' / 'boft_n_butterfly_factor' ({keys}={size or num}, boft_n_butterfly_factor={m}) "
            f"do not fit {len(problems)} targeted module(s) of the model:\n  - " + "\n  - ".join(shown)
        )
    if count == 0 and not config.modules_to_save:
        raise RecipeError(
            f"recipe key 'boft_target_modules' ({peft_config.target_modules!r}) matches no linear module of the model"
        )
    return count


def load_tokenizer(recipe, source: ModelSource | None = None):
    """The recipe's tokenizer (see ``tokenizer_name_or_path``); raises :class:`RecipeError` if it cannot load."""
    from transformers import AutoTokenizer

    source = source or model_source(recipe)
    args = recipe.recipe
    candidates = [args.tokenizer_name_or_path] if args.tokenizer_name_or_path else []
    if (
        not candidates
        and args.init_adapter
        and os.path.isfile(os.path.join(args.init_adapter, "tokenizer_config.json"))
    ):
        candidates = [args.init_adapter]
    if not candidates and source.kind == "config":
        from ..toy import char_tokenizer

        return char_tokenizer()
    path = candidates[0] if candidates else source.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=recipe.model.model_revision, trust_remote_code=recipe.training.trust_remote_code
        )
    except (OSError, ValueError) as err:
        key = "tokenizer_name_or_path" if args.tokenizer_name_or_path else "model_name_or_path"
        raise RecipeError(f"recipe key '{key}': cannot load a tokenizer from {path!r}: {err}") from err
    return tokenizer


def check_tokenizer(tokenizer, model_config, conversational: bool, recipe) -> None:
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise RecipeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; use a matching "
            "tokenizer ('tokenizer_name_or_path') or model"
        )
    template_path = getattr(recipe.training, "chat_template_path", None)
    if conversational and not tokenizer.chat_template and not template_path:
        raise RecipeError(
            "the dataset is conversational but the tokenizer has no chat template; set 'chat_template_path' (SFT) "
            "or use a tokenizer with a chat template ('tokenizer_name_or_path')"
        )


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


def _write_config_model(recipe, source: ModelSource, tokenizer) -> None:
    """Main process: build the seeded random model from its config and save it (and the tokenizer) atomically."""
    import torch

    from ..atomic import atomic_directory

    seed = recipe.recipe.model_seed if recipe.recipe.model_seed is not None else recipe.training.seed
    torch.manual_seed(seed)
    model = _plain_model(source.config)
    with atomic_directory(source.path) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))


def _plain_model(model_config):
    """A model with initialised weights built by its class (never inside DeepSpeed's ``zero.Init``)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    model_class = _get_model_class(model_config, AutoModelForCausalLM._model_mapping)
    return model_class(model_config)


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
    import boft_plugin

    from ..distributed.gather import barrier, rank
    from .fsdp_hook import pre_shard_fsdp2

    boft_plugin.register()
    source = model_source(recipe)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe, source)
    if source.kind == "config":
        if rank() == 0:
            _write_config_model(recipe, source, tokenizer)
        barrier()
    from transformers import AutoModelForCausalLM

    kwargs = _model_init_kwargs(recipe)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot load the model from {source.path!r}: {err}") from err

    args = recipe.recipe
    if args.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            model, args.init_adapter, is_trainable=True, autocast_adapter_dtype=not is_zero3(recipe.training)
        )
        peft_config = None
    else:
        peft_config = recipe.boft.to_peft_config()
    if args.fsdp2_pre_shard:
        if peft_config is not None:
            from peft import get_peft_model

            model, peft_config = get_peft_model(model, peft_config), None
        if recipe.task == "dpo":  # TRL would add its reference adapter after sharding, which FSDP2 cannot manage
            from .reference import add_reference_adapter

            add_reference_adapter(model)
        model = pre_shard_fsdp2(model)
    return Built(model=model, tokenizer=tokenizer, peft_config=peft_config, base_model_path=source.path)
