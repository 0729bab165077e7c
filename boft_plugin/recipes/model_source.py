"""Where a recipe's base model and tokenizer come from, read without loading any weights.

Model sources (exactly one; see ``docs/trl.md``):

- ``model_name_or_path``: a local directory or hub id, loaded with ``from_pretrained``;
- ``model_config`` (a mapping with ``model_type``) or ``tiny_model: true`` (a tiny Llama, ``model_config`` entries
  override it): random weights seeded by ``model_seed`` (default ``seed``). The main process writes this base model
  and its tokenizer to ``<output_dir>/base_model`` (:func:`write_config_model`) and every rank loads it from there
  with ``from_pretrained``, so DeepSpeed ZeRO-3's ``zero.Init`` works as for any checkpoint and the exported adapter
  names a base model that exists;
- none of them with ``init_adapter``: the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

from ..errors import RecipeError
from ..export.layout import BASE_MODEL_DIR
from .args import BoftArguments


@dataclass
class ModelSource:
    kind: str  # "pretrained" or "config"
    path: str | None = None  # from_pretrained path (for "config": where the base model is written)
    config: Any = None  # a transformers PretrainedConfig for "config"


def _adapter_config(path: str) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as handle:
        return json.load(handle)


def _portable(name: str) -> str:
    """A local directory as an absolute path (so the adapter's ``base_model_name_or_path`` works from anywhere);
    a hub id as given."""
    path = os.path.expanduser(name)
    return os.path.abspath(path) if os.path.isdir(path) else name


def model_source(recipe) -> ModelSource:
    """Where the base model comes from; raises :class:`RecipeError` for zero or several sources."""
    args, name = recipe.options, recipe.model.model_name_or_path
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
        return ModelSource("pretrained", path=_portable(name))
    if args.tiny_model or args.model_config:
        from transformers import AutoConfig

        from ..toy.models import tiny_llama_config

        overrides = dict(args.model_config or {})
        try:
            if args.tiny_model:
                overrides.pop("model_type", None)
                config = tiny_llama_config(**overrides)
            else:
                config = AutoConfig.for_model(**overrides)
        except (TypeError, ValueError, KeyError) as err:
            raise RecipeError(f"recipe key 'model_config': cannot build a model config ({err})") from err
        path = os.path.abspath(os.path.join(recipe.training.output_dir, BASE_MODEL_DIR))
        return ModelSource("config", path=path, config=config)
    if args.init_adapter:
        base = _adapter_config(args.init_adapter).get("base_model_name_or_path")
        if not base:
            raise RecipeError(
                f"recipe key 'init_adapter': {args.init_adapter}/adapter_config.json names no base model; set "
                "'model_name_or_path'"
            )
        return ModelSource("pretrained", path=_portable(base))
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
    if not recipe.options.init_adapter:
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
    config = PeftConfig.from_pretrained(recipe.options.init_adapter)
    if getattr(config.peft_type, "value", config.peft_type) != "BOFT":
        raise RecipeError(
            f"recipe key 'init_adapter': {recipe.options.init_adapter} holds a {config.peft_type} adapter, not BOFT"
        )
    return config


def load_tokenizer(recipe, source: ModelSource | None = None):
    """The recipe's tokenizer (see ``tokenizer_name_or_path``); raises :class:`RecipeError` if it cannot load."""
    from transformers import AutoTokenizer

    source = source or model_source(recipe)
    args = recipe.options
    candidates = [args.tokenizer_name_or_path] if args.tokenizer_name_or_path else []
    if (
        not candidates
        and args.init_adapter
        and os.path.isfile(os.path.join(args.init_adapter, "tokenizer_config.json"))
    ):
        candidates = [args.init_adapter]
    if not candidates and source.kind == "config":
        from ..toy.models import char_tokenizer

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


def write_config_model(recipe, source: ModelSource, tokenizer) -> None:
    """Main process: build the seeded random model from its config and save it (and the tokenizer) atomically."""
    import torch

    from ..runtime.atomic import atomic_directory

    seed = recipe.options.model_seed if recipe.options.model_seed is not None else recipe.training.seed
    torch.manual_seed(seed)
    model = model_from_config(source.config)
    with atomic_directory(source.path) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))


def model_from_config(model_config):
    """A model with initialised weights built by its class (never inside DeepSpeed's ``zero.Init``)."""
    return causal_lm_class(model_config)(model_config)


def causal_lm_class(model_config):
    """The ``AutoModelForCausalLM`` class for ``model_config`` (no instance, no weights)."""
    from transformers import AutoModelForCausalLM

    from ..runtime.upstream import model_class_for

    return model_class_for(model_config, AutoModelForCausalLM)
