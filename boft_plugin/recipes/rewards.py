"""GRPO's / RLOO's rewards, named in the recipe as TRL's ``trl grpo`` / ``trl rloo`` name them, checked before any
weights load.

``reward_funcs`` entries are TRL's built-in rewards by name (``accuracy_reward``, ``reasoning_accuracy_reward``,
``think_format_reward``, ``get_soft_overlong_punishment`` with TRL's script values) or a dotted import path
(``my_rewards.length_reward``; the working directory is importable, as in TRL's scripts).
``reward_model_name_or_path`` adds a sequence-classification reward model, which TRL loads.

Each function is imported and then called once (on every rank) on the first training row with an empty
completion, exactly as TRL calls it (``prompts``, ``completions``, ``completion_ids``, the row's other columns,
``trainer_state``, ``log_extra``, ``log_metric``): a function that cannot be imported, is not callable, needs a
column the data lacks, or does not return one number (or None) per completion is refused with the reason, where TRL
would fail at the first generation, after loading the model. An empty completion is one the policy can produce
(an end-of-sequence token first), so a function must handle it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import numbers
import os
import sys
from typing import Any

from ..errors import RecipeError

__all__ = ["BUILT_IN_REWARDS", "resolve_rewards"]

BUILT_IN_REWARDS = (
    "accuracy_reward",
    "reasoning_accuracy_reward",
    "think_format_reward",
    "get_soft_overlong_punishment",
)


def _built_in(name: str):
    """TRL's reward as ``trl grpo`` builds it (trl/scripts/grpo.py)."""
    from trl import rewards

    if name == "get_soft_overlong_punishment":
        return rewards.get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256)
    return getattr(rewards, name)


def _import(name: str):
    module_path, _, attribute = name.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as TRL's scripts: the user's own module beside the recipe
    try:
        module = importlib.import_module(module_path)
    except Exception as err:  # noqa: BLE001 - any import failure of user code means the same thing here
        raise RecipeError(
            f"recipe key 'reward_funcs': cannot import module {module_path!r} for {name!r} "
            f"({type(err).__name__}: {err})"
        ) from None
    if not hasattr(module, attribute):
        raise RecipeError(f"recipe key 'reward_funcs': module {module_path!r} has no {attribute!r} (for {name!r})")
    return getattr(module, attribute)


def _reward_function(name: str):
    if name in BUILT_IN_REWARDS:
        return _built_in(name)
    if "." not in name:
        raise RecipeError(
            f"recipe key 'reward_funcs': unknown reward {name!r}; expected one of TRL's {', '.join(BUILT_IN_REWARDS)} "
            "or a dotted import path (module.function)"
        )
    function = _import(name)
    if not callable(function):
        raise RecipeError(f"recipe key 'reward_funcs': {name!r} is a {type(function).__name__}, not a function")
    return function


def _trial_call(name: str, function, row: dict[str, Any], conversational: bool) -> None:
    """Call ``function`` as TRL does, on ``row`` with an empty completion; raise RecipeError if TRL could not use it."""
    from transformers import TrainerState

    completion: Any = [{"role": "assistant", "content": ""}] if conversational else ""
    columns = {key: [value] for key, value in row.items() if key not in ("prompt", "completion", "completion_ids")}
    fixed = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
    clash = sorted(fixed & set(columns))
    if clash:
        raise RecipeError(
            f"recipe key 'reward_funcs': the data's column(s) {clash} have the names of TRL's own reward arguments; "
            "TRL cannot pass both to a reward function: rename the column(s)"
        )
    kwargs = dict(
        prompts=[row["prompt"]],
        completions=[completion],
        completion_ids=[[]],
        **columns,
        trainer_state=TrainerState(),
        log_extra=lambda *args, **kw: None,
        log_metric=lambda *args, **kw: None,
    )
    try:
        output = function(**kwargs)
        if inspect.isawaitable(output):
            output = _await(output)
    except Exception as err:  # noqa: BLE001 - the user's function; report what it raised
        raise RecipeError(
            f"recipe key 'reward_funcs': {name!r} failed on the first training row with an empty completion "
            f"({type(err).__name__}: {err}); TRL calls it with prompts, completions, completion_ids, trainer_state, "
            f"log_extra, log_metric and the data's other columns ({', '.join(sorted(columns)) or 'none'})"
        ) from None
    try:
        values = list(output)
    except TypeError:
        values = None
    values = [v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for v in values or []] or None
    if values is None or len(values) != 1 or not all(v is None or isinstance(v, numbers.Real) for v in values):
        raise RecipeError(
            f"recipe key 'reward_funcs': {name!r} returned {output!r} for one completion; it must return a list "
            "with one number (or None) per completion"
        )


def _await(coroutine):
    """The value of an async reward's coroutine, in a loop of its own (also when this thread runs one: Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def resolve_rewards(recipe, train_dataset) -> list:
    """The reward functions (and reward model path) to hand to TRL's trainer, each checked (module docstring)."""
    from .data import first_row, is_conversational_dataset

    script, training = recipe.script, recipe.training
    names = list(script.reward_funcs or [])
    rewards: list = []
    if script.reward_model_name_or_path:
        path = os.path.expanduser(script.reward_model_name_or_path)
        looks_local = script.reward_model_name_or_path.startswith((".", "/", "~")) or os.path.exists(path)
        if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
            raise RecipeError(
                f"recipe key 'reward_model_name_or_path': {script.reward_model_name_or_path} is not a model "
                "directory (no config.json)"
            )
        rewards.append(script.reward_model_name_or_path)
    if not names and not rewards:
        raise RecipeError(
            f"`boft-plugin {recipe.task}` needs a reward: set 'reward_funcs' (TRL's {', '.join(BUILT_IN_REWARDS)}, "
            "or module.function) or 'reward_model_name_or_path'"
        )
    row = first_row(train_dataset)
    conversational = is_conversational_dataset(train_dataset)
    for name in names:
        function = _reward_function(name)
        _trial_call(name, function, row, conversational)
        rewards.append(function)
    weights = training.reward_weights
    if weights is not None and len(weights) != len(rewards):
        named = [script.reward_model_name_or_path] if script.reward_model_name_or_path else []
        raise RecipeError(
            f"recipe key 'reward_weights': {len(weights)} weight(s) for {len(rewards)} reward(s) "
            f"({', '.join(named + names)})"
        )
    return rewards
