"""Generation with the adapter active, for GRPO / RLOO, under every engine, without a rank holding the whole model.

TRL generates through ``unwrap_model_for_generation`` and the model's own ``generate``:

- ZeRO-3: TRL's default ``ds3_gather_for_generation: true`` gathers *every* parameter on every rank for each
  generation (the whole model, once per generation batch). A recipe defaults it to false: DeepSpeed's hooks
  gather one module at a time, as in training; transformers' ``generate`` then keeps the ranks in step
  (``synced_gpus``, on under ZeRO-3), so a rank whose completions ended early still joins the others' forwards.
  A recipe that sets it true keeps it, with a warning (faster generation where the whole model fits).
- FSDP2 (sharded before the Trainer): ``generate`` runs the causal LM inside the ``PeftModel``, so the root
  unit's own parameters (what no block unit holds) are gathered around it (:meth:`Engine.generating`), and
  transformers is told the model is FSDP-managed so that it keeps the ranks in step too.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["check_generation_backend", "generation_defaults", "warn_if_generation_gathers"]


def generation_defaults(given: Callable[[str], bool]) -> dict:
    """Recipe defaults for generation (keys the recipe or flags set are kept): see the module docstring."""
    return {} if given("ds3_gather_for_generation") else {"ds3_gather_for_generation": False}


def check_generation_backend(training) -> None:
    """Refuse ``use_vllm`` where vLLM is not installed (TRL would fail after loading the model)."""
    import importlib.util

    from ..errors import RecipeError

    if getattr(training, "use_vllm", False) and importlib.util.find_spec("vllm") is None:
        raise RecipeError(
            "recipe key 'use_vllm': vLLM is not installed in this environment; install it, or leave use_vllm false "
            "(generation then runs through transformers' generate under the recipe's engine)"
        )


def warn_if_generation_gathers(training, engine: str) -> None:
    """Warn when TRL will gather the whole model on every rank for each generation (ZeRO-3, the key set true)."""
    if engine == "zero3" and training.ds3_gather_for_generation:
        import warnings

        warnings.warn(
            "ds3_gather_for_generation: true gathers every parameter of the model on every rank for each "
            "generation (the whole model per rank); the recipe default false gathers one module at a time",
            stacklevel=2,
        )
