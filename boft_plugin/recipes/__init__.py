"""TRL SFT and DPO recipes for BOFT: YAML + flags (TRL's ``TrlParser``), data, one builder, train, export.

Command line: ``boft-plugin sft --config recipe.yaml [--key value ...]`` (also ``dpo``, ``python -m boft_plugin``).
Python::

    from boft_plugin.recipes import parse_recipe, run
    recipe = parse_recipe("sft", ["--config", "recipe.yaml", "--max_steps", "10"])
    result = run(recipe)              # checks, build, train, export into recipe.training.output_dir

Modules: :mod:`.args` (BOFT and recipe dataclasses), :mod:`.parsing`, :mod:`.data`, :mod:`.builder`,
:mod:`.train`, :mod:`.outputs`, :mod:`.verify` (fresh-process reload checks), :mod:`.toy_tasks` (synthetic data),
:mod:`.fsdp_hook`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "RecipeError": ".errors",
    "BoftArguments": ".args",
    "RecipeArguments": ".args",
    "Recipe": ".parsing",
    "parse_recipe": ".parsing",
    "make_parser": ".parsing",
    "load_recipe_data": ".data",
    "Built": ".builder",
    "build": ".builder",
    "check_geometry": ".builder",
    "prepare": ".train",
    "make_trainer": ".train",
    "run": ".train",
    "sync_reference_adapter": ".reference",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'boft_plugin.recipes' has no attribute {name!r}")
