"""Recipe parsing: a YAML mapping plus command-line flags, through :class:`RecipeParser`, a ``TrlParser``.

Every field of TRL's ``SFTConfig`` / ``DPOConfig`` / ``KTOConfig`` / ``GRPOConfig`` / ``RLOOConfig`` (and so of
``transformers.TrainingArguments``), ``ModelConfig``, the script's ``ScriptArguments`` (GRPO / RLOO: with
``reward_funcs``) and ``DatasetMixtureConfig`` is a recipe key and a ``--flag`` exactly as in TRL's own ``trl sft``
/ ``dpo`` / ``kto`` / ``grpo`` / ``rloo`` scripts, next to :class:`~boft_plugin.recipes.args.BoftArguments` and
:class:`~boft_plugin.recipes.args.RecipeOptions`. Flags override the YAML (``TrlParser`` turns the YAML into
argparse defaults, in its own ``parse_args_and_config``, which :class:`RecipeParser` calls). Differences from
TRL's scripts, on purpose:

- an unknown YAML key or flag is an error naming it (TRL's scripts pass ``fail_with_unknown_args=False`` and
  drop unknown YAML keys silently);
- ``ModelConfig``'s LoRA keys are refused (this is a BOFT recipe); its bitsandbytes keys (``load_in_4bit``, ...)
  load a quantised base as TRL's scripts do (:mod:`.quantisation`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trl import TrlParser

from ..errors import RecipeError
from ..runtime.process_exit import launched_world_size
from .args import BoftArguments, RecipeOptions
from .quantisation import check_packed_codes_survive_half_mode

TASKS = ("sft", "dpo", "kto", "grpo", "rloo")
# the online-RL tasks: TRL generates completions with the policy and scores them with reward functions
RL_TASKS = ("grpo", "rloo")

# ModelConfig keys that select LoRA; a BOFT recipe refuses them when set to a non-default value.
_REFUSED_MODEL_KEYS = {
    "use_peft": "the BOFT adapter is always used; set boft_* keys",
    "lora_r": "use boft_block_size / boft_block_num",
    "lora_alpha": "BOFT has no alpha",
    "lora_dropout": "use boft_dropout",
    "lora_target_modules": "use boft_target_modules",
    "lora_target_parameters": "BOFT adapts modules; use boft_target_modules",
    "lora_modules_to_save": "use boft_modules_to_save",
    "lora_task_type": "the task type is CAUSAL_LM",
    "use_rslora": "a LoRA option",
    "use_dora": "a LoRA option",
}


@dataclass
class Recipe:
    """A parsed recipe: the task and one instance of each argument dataclass."""

    task: str
    script: Any  # trl.ScriptArguments (GRPO / RLOO: TRL's script arguments with reward_funcs)
    training: Any  # trl.SFTConfig, DPOConfig, KTOConfig, GRPOConfig or RLOOConfig
    model: Any  # trl.ModelConfig
    mixture: Any  # trl.DatasetMixtureConfig
    boft: BoftArguments
    options: RecipeOptions
    config_path: str | None = None
    notes: tuple[str, ...] = ()  # what parsing changed on the user's behalf (logged by the run)


def _dataclass_types(task: str) -> tuple[type, ...]:
    from trl import (
        DatasetMixtureConfig,
        DPOConfig,
        GRPOConfig,
        KTOConfig,
        ModelConfig,
        RLOOConfig,
        ScriptArguments,
        SFTConfig,
    )

    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    training = {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}[task]
    script = ScriptArguments
    if task == "grpo":  # TRL's own script arguments: + reward_funcs, reward_model_name_or_path
        from trl.scripts.grpo import GRPOScriptArguments as script
    elif task == "rloo":
        from trl.scripts.rloo import RLOOScriptArguments as script
    return (script, training, ModelConfig, DatasetMixtureConfig, BoftArguments, RecipeOptions)


class RecipeParser(TrlParser):
    """TRL's ``TrlParser`` over one task's recipe dataclasses, strict about keys and prepared for this machine.

    ``parse_args_and_config`` is TRL's own (it reads ``--config``, sets the YAML's ``env``, turns the YAML into
    defaults through :meth:`set_defaults_with_config` and parses the flags over them); this class adds, around it:
    the YAML and a Python ``mapping`` checked key by key first (an unknown key is an error naming it, where TRL's
    scripts drop it), the DeepSpeed precision and CPU launch defaults applied to the merged keys and the flags
    before TRL sees them, unknown flags refused, and TRL's ``ValueError`` / ``TypeError`` given as
    :class:`RecipeError`. Its help shows ``--config`` first and hides the LoRA flags a BOFT recipe refuses.
    """

    def __init__(self, task: str, prog: str | None = None, mapping: dict | None = None):
        super().__init__(_dataclass_types(task), prog=prog or f"boft-plugin {task}", allow_abbrev=False)
        self.task = task
        self.mapping = dict(mapping or {})
        self.config_path: str | None = None
        self.notes: tuple[str, ...] = ()
        self._prepared: dict[str, Any] = {}
        self._env_prepared: dict[str, str] = {}
        self.half_mode: str | None = None  # DeepSpeed's own half-precision dtype, when its config enables it
        for action in self._actions:
            if action.dest in _REFUSED_MODEL_KEYS:
                action.help = argparse.SUPPRESS
        config = self.add_argument(
            "--config",
            metavar="RECIPE.yaml",
            help="The recipe: a YAML mapping of any keys below (flags given on the command line override it).",
        )
        group = self._optionals._group_actions  # argparse lists options in this order: --config after --help
        group.insert(1, group.pop(group.index(config)))
        self.usage = f"boft-plugin {task} --config RECIPE.yaml [--key value ...]   (every key below, YAML or flag)"

    def parse_args_and_config(self, args=None, **_ignored):
        """``(script, training, model, mixture, boft, options)`` for ``args`` (flags, maybe ``--config PATH``;
        ``sys.argv[1:]`` when None, as TRL's)."""
        args = list(sys.argv[1:] if args is None else args)
        for index, arg in enumerate(args):  # TRL looks for "--config" alone; "--config=PATH" would be dropped
            if arg.startswith("--config="):
                args[index : index + 1] = ["--config", arg.removeprefix("--config=")]
                break
        merged = self._read_recipe(args)
        env = merged.pop("env", None) or {}
        for key, value in env.items():  # the mapping's env (TRL sets the YAML's again)
            os.environ[str(key)] = str(value)
        before = dict(os.environ)
        self._prepared = self._prepare(merged, args)
        # what preparing changed in the environment (the DeepSpeed config accelerate reads): TRL then sets the YAML's
        # env again, so set_defaults_with_config, which TRL calls after that, puts these back
        self._env_prepared = {k: v for k, v in os.environ.items() if before.get(k) != v}
        if self.config_path is None:  # TRL applies the defaults only when it reads a --config file
            self.set_defaults_with_config()
        try:
            *parsed, from_config, from_flags = super().parse_args_and_config(
                args, return_remaining_strings=True, separate_remaining_strings=True
            )
        except RecipeError:
            raise
        except (TypeError, ValueError) as err:
            raise RecipeError(f"invalid recipe for `boft-plugin {self.task}`: {err}") from err
        if from_config:  # unreachable after _check_keys, kept as TRL's own guard
            raise _unknown_key_error(from_config[::2], self.task, self.config_path or "the recipe mapping")
        if from_flags:
            flags = [item.lstrip("-").split("=")[0] for item in from_flags if item.startswith("--")]
            if flags:
                raise _unknown_key_error(flags, self.task, "the command line")
            raise RecipeError(f"unexpected command-line argument(s): {' '.join(from_flags)}")
        return tuple(parsed[:6])  # then a namespace holding --config (help only)

    def set_defaults_with_config(self, **_yaml) -> list[str]:
        """The prepared keys (the mapping and the YAML, as :meth:`parse_args_and_config` prepared them) as the
        parser's defaults; TRL passes the raw YAML, which is already in them. The environment preparing changed is
        set again (TRL has just set the YAML's ``env``)."""
        os.environ.update(self._env_prepared)
        return super().set_defaults_with_config(**self._prepared)

    def parse_args_into_dataclasses(self, *args, **kwargs):
        """As transformers', but never reading a ``<script>.args`` file beside the program (TRL's call would): a
        recipe is its YAML and its flags only."""
        kwargs["look_for_args_file"] = False
        return super().parse_args_into_dataclasses(*args, **kwargs)

    def _read_recipe(self, args: list[str]) -> dict:
        if self.mapping:
            _check_keys(self.mapping, self.task, "the recipe mapping")
        merged = dict(self.mapping)
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise RecipeError("--config needs a path to a recipe YAML file")
            self.config_path = args[index + 1]
            from_file = _load_yaml(self.config_path)
            _check_keys(from_file, self.task, self.config_path)
            merged.update(from_file)
        return merged

    def _prepare(self, merged: dict, args: list[str]) -> dict:
        """This machine's defaults on the merged keys; the flags (``args``) are rewritten in place where a key
        they set changes (DeepSpeed's precision)."""
        from .deepspeed_precision import check_half_precision_has_a_gpu, deepspeed_half_mode, use_torch_autocast

        note = use_torch_autocast(merged, args, _has_accelerator())
        self.notes = (note,) if note else ()
        check_half_precision_has_a_gpu(merged, args, _has_accelerator())
        self.half_mode = deepspeed_half_mode(merged, args, _has_accelerator())
        merged.update(cpu_launch_defaults(merged, args))
        if self.task in RL_TASKS:
            from .generation import generation_defaults

            merged.update(generation_defaults(lambda key: _given(key, merged, args)))
        prefer_activation_checkpointing(merged, args)
        return merged


def make_parser(task: str, prog: str | None = None, mapping: dict | None = None):
    """A :class:`RecipeParser` (TRL's ``TrlParser``) for ``task`` (one of :data:`TASKS`)."""
    return RecipeParser(task, prog=prog, mapping=mapping)


def recipe_keys(task: str) -> set[str]:
    """Every key a recipe for ``task`` accepts (YAML keys and ``--flags`` without dashes)."""
    return {f.name for cls in _dataclass_types(task) for f in dataclasses.fields(cls) if f.init} | {"env"}


def _unknown_key_error(keys: Sequence[str], task: str, where: str) -> RecipeError:
    known = recipe_keys(task)
    others = {other: recipe_keys(other) - known for other in TASKS if other != task}
    lines = []
    for key in keys:
        line = f"'{key}'"
        owners = [other for other, other_keys in others.items() if key in other_keys]
        if owners:
            tasks = " / ".join(other.upper() for other in owners)
            line += f" (a {tasks} key: run `boft-plugin {' | '.join(owners)}`)"
        else:
            close = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=3)
            if close:
                line += f" (did you mean {', '.join(repr(c) for c in close)}?)"
        lines.append(line)
    return RecipeError(
        f"unknown recipe key(s) in {where} for `boft-plugin {task}`: {'; '.join(lines)}. "
        f"Run `boft-plugin {task} --help` for the accepted keys."
    )


def _load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path} does not exist")
    with open(path) as handle:
        try:
            config = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe file {path} is not valid YAML: {err}") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RecipeError(f"recipe file {path} must hold a YAML mapping of keys to values")
    return config


def _check_keys(config: dict, task: str, path: str) -> None:
    unknown = [str(key) for key in config if key not in recipe_keys(task)]
    if unknown:
        raise _unknown_key_error(unknown, task, f"{path}")
    if "env" in config and not isinstance(config["env"], dict):
        raise RecipeError(f"recipe key 'env' in {path}: must be a mapping of environment variables")
    if "datasets" in config:
        from trl.scripts.utils import DatasetConfig

        allowed = {f.name for f in dataclasses.fields(DatasetConfig)}
        entries = config["datasets"]
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise RecipeError(f"recipe key 'datasets' in {path}: must be a list of mappings (path, data_files, ...)")
        for index, entry in enumerate(entries):
            unknown = sorted(set(entry) - allowed)
            if unknown or "path" not in entry:
                problem = f"unknown key(s) {unknown}" if unknown else "missing 'path'"
                raise RecipeError(
                    f"recipe key 'datasets' entry {index} in {path}: {problem}; accepted keys: {sorted(allowed)}"
                )


def _check_model_keys(model_args) -> None:
    from trl import ModelConfig

    defaults = ModelConfig()
    for key, why in _REFUSED_MODEL_KEYS.items():
        if getattr(model_args, key) != getattr(defaults, key):
            raise RecipeError(f"recipe key '{key}' is not supported by a BOFT recipe: {why}")


def _given(key: str, merged: dict, args: Sequence[str]) -> bool:
    flags = {f"--{key}", f"--{key.replace('_', '-')}", f"--no_{key}", f"--no-{key.replace('_', '-')}"}
    return key in merged or any(a.split("=")[0] in flags for a in args)


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def cpu_launch_defaults(merged: dict, args: Sequence[str]) -> dict:
    """Defaults that make TRL's configs run, and really distribute, on a machine without GPUs.

    transformers' ``TrainingArguments`` (under TRL's configs) needs ``use_cpu`` on such a machine: without it TRL's
    default ``bf16: true`` is refused ("Your setup doesn't support bf16/gpu"), and every rank of
    ``torch.distributed.run`` / ``accelerate launch`` (MULTI_GPU config) silently trains alone (world_size 1).
    Under DeepSpeed (which finds the CPU itself and which ``use_cpu`` would switch off) the ranks see world_size 1
    unless ``ddp_backend`` names gloo, and DeepSpeed's own half-precision modes are refused (a recipe's ``bf16``
    runs DeepSpeed's torch_autocast instead: :mod:`.deepspeed_precision`). Keys the recipe or the flags set are
    never changed here.
    """
    if _has_accelerator():
        return {}
    from .deepspeed_precision import deepspeed_requested

    deepspeed = deepspeed_requested(merged, args)
    wanted = {"ddp_backend": "gloo", "bf16": False} if deepspeed else {"use_cpu": True}
    return {key: value for key, value in wanted.items() if not _given(key, merged, args)}


_CHECKPOINTING_ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def prefer_activation_checkpointing(merged: dict, args: list[str]) -> None:
    """Use transformers' current names for TRL's ``gradient_checkpointing*`` keys, in place.

    transformers 5.24 renamed them ``activation_checkpointing*`` and warns on every run that sets the old names;
    TRL's configs set ``gradient_checkpointing: true`` by default, so every recipe would warn. Values are kept.
    """
    from trl import SFTConfig

    for old, new in _CHECKPOINTING_ALIASES.items():
        if old in merged:
            merged.setdefault(new, merged.pop(old))
        for index, arg in enumerate(args):
            flag, eq, value = arg.partition("=")
            if flag.lstrip("-").replace("-", "_") == old:
                args[index] = f"--{new}{eq}{value}"
    if "activation_checkpointing" not in merged:
        default = next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "gradient_checkpointing")
        merged["activation_checkpointing"] = default  # TRL's default (True), under its current name


def _check_world_size(training) -> None:
    launched = launched_world_size()
    if launched > 1 and training.world_size != launched:
        raise RecipeError(
            f"launched as {launched} processes but the trainer sees world_size={training.world_size}: each rank "
            "would train alone. On a machine without GPUs use 'use_cpu: true' (DDP over gloo), or DeepSpeed through "
            "`accelerate launch` with integrations/accelerate/zero*.yaml and 'ddp_backend: gloo'."
        )


def _check_report_to(training) -> None:
    """Refuse logging integrations that are not installed, before anything is written (the Trainer fails later)."""
    from transformers.integrations import get_available_reporting_integrations

    requested = training.report_to or []
    requested = [requested] if isinstance(requested, str) else list(requested)
    available = get_available_reporting_integrations()
    missing = [name for name in requested if name not in ("none", "all") and name not in available]
    if missing:
        raise RecipeError(
            f"recipe key 'report_to': {', '.join(missing)} is not installed in this environment (install it, or use "
            f"report_to: none); installed integrations: {', '.join(available) or 'none'}"
        )


def parse_recipe(task: str, argv: Sequence[str] | None = None, config: dict | None = None) -> Recipe:
    """Parse ``--config recipe.yaml`` and flags (``argv``) into a :class:`Recipe`; nothing is loaded.

    Args:
        task: one of :data:`TASKS` ('sft', 'dpo', 'kto', 'grpo', 'rloo').
        argv: command-line arguments after the subcommand (may hold ``--config PATH``).
        config: a recipe mapping given in Python instead of a YAML file (keys as in the YAML); flags in
            ``argv`` override it too.

    Raises:
        RecipeError: unknown keys or flags, refused keys, invalid values, a missing recipe file.
    """
    parser = make_parser(task, mapping=config)
    script, training, model, mixture, boft, options = parser.parse_args_and_config(list(argv or []))
    half_mode = parser.half_mode
    _check_model_keys(model)
    check_packed_codes_survive_half_mode(model, half_mode)
    _check_world_size(training)
    _check_report_to(training)
    return Recipe(
        task, script, training, model, mixture, boft, options, config_path=parser.config_path, notes=parser.notes
    )
