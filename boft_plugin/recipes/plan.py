"""A recipe resolved once: every fact the build, the trainer and the exports need, checked before any weights load.

``prepare(recipe)`` reads the data, the model's config (not its weights), the tokenizer and the output directory, and
decides what to resume from; it writes nothing. The :class:`RunPlan` it returns is what :func:`.builder.build`,
:func:`.train.make_trainer` and :func:`.train.finish` consume, so nothing is worked out twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checkpoints.resume import ResumePlan, agreed_resume_plan
from .data import is_conversational_dataset, load_recipe_data
from .data_order import check_data_order
from .engine_choice import engine_for, engine_of
from .generation import check_generation_backend, warn_if_generation_gathers
from .geometry_check import check_geometry
from .model_source import (
    ModelSource,
    adapter_peft_config,
    check_tokenizer,
    load_tokenizer,
    model_config_of,
    model_source,
)
from .output_guard import check_output_dir
from .parsing import RL_TASKS
from .quantisation import check_quantisation
from .rewards import resolve_rewards

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from .parsing import Recipe

__all__ = ["RunPlan", "prepare"]


@dataclass
class RunPlan:
    """A checked recipe (see the module docstring).

    Attributes:
        recipe: the parsed recipe it came from.
        source: where the base model comes from (a checkpoint path, or a config to build and save).
        model_config: the base model's transformers config.
        peft_config: the adapter this run trains: the recipe's ``boft_*`` keys, or the ``init_adapter``'s own config.
        tokenizer: the run's tokenizer (loaded once).
        train_dataset / eval_dataset: the data (``datasets`` objects; ``eval_dataset`` may be None).
        engine: ``single``, ``ddp``, ``zero2``, ``zero3`` or ``fsdp2`` (how the model is placed on the ranks).
        resume: what training resumes from and which checkpoints it owns.
        reward_funcs: GRPO / RLOO: the rewards handed to TRL's trainer (functions, a reward model path), checked.
    """

    recipe: Recipe
    source: ModelSource
    model_config: PretrainedConfig
    peft_config: PeftConfig
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Any
    eval_dataset: Any
    engine: str
    resume: ResumePlan
    reward_funcs: list = field(default_factory=list)
    _engine: Any = field(default=None, init=False, repr=False)

    @property
    def base_model_path(self) -> str:
        return self.source.path

    def engine_object(self):
        """The engine (``boft_plugin.distributed``) that places this run's model; made once."""
        if self._engine is None:
            self._engine = engine_for(self.engine, self.recipe.training, self.recipe.options)
        return self._engine


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # streaming
        return None


def prepare(recipe: Recipe, train_dataset=None, eval_dataset=None) -> RunPlan:
    """Check the data, model config, BOFT geometry (meta device), tokenizer, output directory and resume point.

    Collective when the ranks are launched (the resume decision is rank 0's, known to all). Raises
    :class:`~boft_plugin.errors.RecipeError` naming the key, file or module at fault; writes nothing.
    """
    training, options = recipe.training, recipe.options
    engine = engine_of(training, options)
    check_quantisation(recipe.model, engine, options.fsdp2_pre_shard)
    train, evaluation = load_recipe_data(recipe, train_dataset, eval_dataset)
    check_data_order(training, options, _length(train), recipe.task)
    reward_funcs = []
    if recipe.task in RL_TASKS:
        reward_funcs = resolve_rewards(recipe, train)
        check_generation_backend(training)
        warn_if_generation_gathers(training, engine)
    source = model_source(recipe)
    peft_config = adapter_peft_config(recipe)
    check_output_dir(training.output_dir, peft_config, source.path, options.overwrite_output_dir)
    resume = agreed_resume_plan(
        training.resume_from_checkpoint,
        training.output_dir,
        overwrite=options.overwrite_output_dir,
        trust=options.trust_checkpoint,
    )
    model_config = model_config_of(recipe, source)
    check_geometry(model_config, peft_config)
    tokenizer = load_tokenizer(recipe, source)
    check_tokenizer(tokenizer, model_config, is_conversational_dataset(train), recipe)
    return RunPlan(
        recipe=recipe,
        source=source,
        model_config=model_config,
        peft_config=peft_config,
        tokenizer=tokenizer,
        train_dataset=train,
        eval_dataset=evaluation,
        engine=engine,
        resume=resume,
        reward_funcs=reward_funcs,
    )
