"""Check a recipe's BOFT geometry against the model's layer widths before any weights are loaded.

The model is built on the meta device (no memory) and the tuner's own planner (``tuner.targets.plan_targets``,
the same code that checks a config when PEFT adapts the model) decides; this module only adds the recipe's key
names and the one TRL-specific rule (no adapter on the output layer).
"""

from __future__ import annotations

from ..errors import RecipeError
from .model_source import causal_lm_class

MAX_SHOWN = 8


def meta_model(model_config):
    """The model on the meta device (no memory, no weights, outside any DeepSpeed ``zero.Init``)."""
    import torch

    with torch.device("meta"):
        return causal_lm_class(model_config)(model_config)


def check_geometry(model_config, peft_config) -> int:
    """Check every module ``peft_config`` targets in a model of ``model_config`` (meta device, no weights).

    Returns the number of adapted modules (-1 when the architecture cannot be built on the meta device; the tuner
    checks again when it adapts); raises :class:`RecipeError` naming the recipe keys, the modules and their widths,
    with valid alternatives.
    """
    from ..errors import BoftTargetError
    from ..tuner.targets import plan_targets, resolve_target_modules

    try:
        model = meta_model(model_config)
    except Exception as err:  # noqa: BLE001 - unknown architectures: the tuner checks again when it adapts
        import warnings

        warnings.warn(f"BOFT geometry not checked before loading ({type(err).__name__}: {err})", stacklevel=2)
        return -1
    try:
        resolved = resolve_target_modules(peft_config, model)
    except BoftTargetError as err:
        raise RecipeError(f"recipe key 'boft_target_modules': {err}") from None
    _refuse_output_layer(model, resolved)
    plans, problems = plan_targets(model, resolved)
    size, num, m = peft_config.boft_block_size, peft_config.boft_block_num, peft_config.boft_n_butterfly_factor
    keys = "boft_block_size" if size else "boft_block_num"
    if problems:
        shown = problems[:MAX_SHOWN] + (
            [f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else []
        )
        raise RecipeError(
            f"recipe keys '{keys}' / 'boft_n_butterfly_factor' ({keys}={size or num}, boft_n_butterfly_factor={m}) "
            f"do not fit {len(problems)} targeted module(s) of the model:\n  - " + "\n  - ".join(shown)
        )
    if not plans and not peft_config.modules_to_save:
        raise RecipeError(
            f"recipe key 'boft_target_modules' ({peft_config.target_modules!r}) matches no linear module of the model"
        )
    return len(plans)


def _refuse_output_layer(model, config) -> None:
    from ..tuner.targets import is_targeted

    output_layer = model.get_output_embeddings()
    if output_layer is None:
        return
    for key, module in model.named_modules():
        if module is output_layer and is_targeted(config, key):
            raise RecipeError(
                f"recipe key 'boft_target_modules' selects the output layer '{key}': TRL 1.16 computes "
                "log-probabilities from its weight directly, so an adapter there would never train; remove it "
                "(or train it in full with 'boft_modules_to_save')"
            )
