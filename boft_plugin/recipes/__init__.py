"""TRL SFT and DPO recipes for BOFT: YAML + flags (TRL's ``TrlParser``), data, one builder, train, export.

Command line: ``boft-plugin sft --config recipe.yaml [--key value ...]`` (also ``dpo``, ``python -m boft_plugin``).
Python::

    from boft_plugin.recipes import parse_recipe, run
    recipe = parse_recipe("sft", ["--config", "recipe.yaml", "--max_steps", "10"])
    result = run(recipe)              # checks, build, train, export into recipe.training.output_dir

Modules: :mod:`.args` (BOFT and recipe dataclasses), :mod:`.parsing`, :mod:`.data`, :mod:`.model_source`,
:mod:`.geometry_check`, :mod:`.builder` (the one builder), :mod:`.trainers` (TRL trainers with boft-plugin's
mixin) and :mod:`.callbacks`, :mod:`.checkpoints` / :mod:`.dcp_checkpoints` / :mod:`.universal_checkpoints`
(kill-safe Trainer checkpoints, resume on another world size), :mod:`.dpo_reference`, :mod:`.train` (prepare,
run, finish), :mod:`.outputs`, :mod:`.verify` (fresh-process reload checks).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "RecipeError": "..errors",
    "BoftArguments": ".args",
    "RecipeOptions": ".args",
    "Recipe": ".parsing",
    "parse_recipe": ".parsing",
    "make_parser": ".parsing",
    "RecipeParser": ".parsing",
    "load_recipe_data": ".data",
    "Built": ".builder",
    "build": ".builder",
    "check_geometry": ".geometry_check",
    "prepare": ".plan",
    "RunPlan": ".plan",
    "make_trainer": ".train",
    "run": ".train",
    "sync_reference_adapter": ".dpo_reference",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'boft_plugin.recipes' has no attribute {name!r}")
