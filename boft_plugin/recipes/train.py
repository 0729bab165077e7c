"""Train a recipe: checks without weights, build, TRL's SFT/DPO trainer, then export on every rank.

``run(recipe)`` is what ``boft-plugin sft|dpo`` calls on each rank (under ``torch.distributed.run``, ``accelerate
launch`` with any of ``integrations/accelerate/*.yaml``, or one process).

DPO and its reference model (TRL 1.16):

- fresh adapter (the recipe's ``boft_*`` keys): the BOFT config goes to ``DPOTrainer(peft_config=...)``; TRL wraps
  the model and computes the reference with the adapter disabled: no second model, no second adapter;
- ``init_adapter`` (e.g. an SFT run's output): the adapter is loaded trainable and DPO continues training it. TRL,
  given a ``PeftModel``, adds a frozen ``ref`` adapter and means it to be a copy of ``default``, but it copies only
  parameters whose name contains ``.default.``; BOFT's are named ``...boft_R.default``, so the ``ref`` adapter
  would silently stay at its identity init (the reference would be the base model, not the SFT model).
  :func:`sync_reference_adapter` copies every ``default`` adapter tensor into ``ref`` and checks it, so the
  reference is the SFT policy as loaded. The cost is one frozen adapter copy (no optimizer state), not a model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..distributed.gather import gather_objects
from ..export import export_adapter
from ..process_memory import PhasePeaks, limit_heap_retention, malloc_trim
from .builder import build
from .checkpoints import checkpoint_to_resume
from .data import is_conversational_dataset, load_recipe_data
from .data_order import check_data_order
from .dpo_reference import sync_reference_adapter
from .errors import RecipeError
from .geometry_check import check_geometry
from .model_source import adapter_peft_config, check_tokenizer, load_tokenizer, model_config_of, model_source
from .output_guard import check_output_dir
from .outputs import PROBE_FILE, SINGLE_FACTOR_DIR, export_merged_model, summarize, write_probe, write_summary


@dataclass
class Prepared:
    """Everything checked before any weights are loaded."""

    train_dataset: Any
    eval_dataset: Any
    tokenizer: Any
    model_config: Any
    peft_config: Any
    adapted_modules: int


def prepare(recipe, train_dataset=None, eval_dataset=None) -> Prepared:
    """Check the data, tokenizer, model config and BOFT geometry (meta device): raise :class:`RecipeError` early."""
    train, evaluation = load_recipe_data(recipe, train_dataset, eval_dataset)
    check_data_order(recipe.training, recipe.options, _length(train), recipe.task)
    source = model_source(recipe)
    peft_config = adapter_peft_config(recipe)
    check_output_dir(recipe.training.output_dir, peft_config, source.path, recipe.options.overwrite_output_dir)
    checkpoint_to_resume(recipe.training.resume_from_checkpoint, recipe.training.output_dir)
    model_config = model_config_of(recipe, source)
    adapted = check_geometry(model_config, peft_config)
    tokenizer = load_tokenizer(recipe, source)
    check_tokenizer(tokenizer, model_config, is_conversational_dataset(train), recipe)
    return Prepared(train, evaluation, tokenizer, model_config, peft_config, adapted)


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # streaming
        return None


def make_trainer(recipe, built, train_dataset, eval_dataset):
    """boft-plugin's TRL ``SFTTrainer`` / ``DPOTrainer`` for ``built`` (see :func:`.builder.build`)."""
    from .trainers import BoftDPOTrainer, BoftSFTTrainer

    common = dict(
        model=built.model,
        args=recipe.training,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=built.tokenizer,
        peft_config=built.peft_config,
        data_order_tail=recipe.options.data_order_tail,
    )
    if recipe.task == "sft":
        return BoftSFTTrainer(**common)
    trainer = BoftDPOTrainer(**common)
    if recipe.script.ignore_bias_buffers:  # as TRL's dpo.py
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


@dataclass
class RunResult:
    trainer: Any
    summary: dict
    output_dir: str


def run(recipe, train_dataset=None, eval_dataset=None, end: bool = False) -> RunResult:
    """Check, build, train and export one recipe on this rank (every rank calls it).

    Args:
        recipe: a parsed :class:`~boft_plugin.recipes.parsing.Recipe`.
        train_dataset / eval_dataset: in-memory datasets instead of the recipe's data keys.
        end: call ``trainer.end()`` at the end (trackers closed, process group destroyed), as TRL's scripts do.
    """
    started = time.time()
    limit_heap_retention()  # freed weight-sized blocks go back to the OS (boft_plugin.process_memory)
    with PhasePeaks() as peaks:  # this rank's peak resident memory per phase, in the run's summary
        peaks.phase("prepare")
        prepared = prepare(recipe, train_dataset, eval_dataset)
        peaks.phase("load")
        built = build(recipe, tokenizer=prepared.tokenizer)
        malloc_trim()  # what loading freed (whole tensors read once, construction buffers) goes back to the OS
        peaks.phase("train")
        trainer = make_trainer(recipe, built, prepared.train_dataset, prepared.eval_dataset)
        trainer.train(resume_from_checkpoint=recipe.training.resume_from_checkpoint)
        result = finish(recipe, trainer, built, started, peaks)
    if recipe.training.push_to_hub:
        trainer.push_to_hub(dataset_name=recipe.script.dataset_name)
    if end and hasattr(trainer, "end"):
        trainer.end()
    return result


def release_zero3_parameters(trainer) -> None:
    """Wait for and release every ZeRO-3 parameter still gathered or in flight (prefetched by an engine).

    After DPO with precomputed reference log-probs TRL keeps a second (inference) DeepSpeed engine on the same
    model; a parameter it prefetched can still be in flight, and gathering it for export then fails with
    "Cannot partition a param in flight".
    """
    engines = [getattr(trainer, "model_wrapped", None), getattr(trainer, "_precompute_engine", None)]
    seen = set()
    for engine in engines:
        if engine is None or id(engine) in seen or not hasattr(engine, "empty_partition_cache"):
            continue
        seen.add(id(engine))
        engine.empty_partition_cache()


def finish(recipe, trainer, built, started: float | None = None, peaks: PhasePeaks | None = None) -> RunResult:
    """End of run on every rank: export the adapter (and merged model), the probe logits, the summary."""
    output_dir = recipe.training.output_dir
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    release_zero3_parameters(trainer)
    from ..distributed.gather import rank, unwrap_peft_model

    adapter = unwrap_peft_model(model).active_adapters[0]
    phase = peaks.phase if peaks is not None else (lambda name: None)
    phase("export_adapter")
    files: dict[str, Any] = {"adapter": export_adapter(model, output_dir, adapter_names=[adapter])}
    if rank() == 0:
        built.tokenizer.save_pretrained(output_dir)
    if recipe.options.export_single_factor:
        phase("export_single_factor")
        files["single_factor"] = export_adapter(
            model, os.path.join(output_dir, SINGLE_FACTOR_DIR), adapter_names=[adapter], single_factor=True
        )
    if recipe.options.export_merged:
        phase("export_merged")
        files["merged"] = export_merged_model(model, output_dir, tokenizer=built.tokenizer)
    if recipe.options.probe_text:
        phase("probe")
        files["probe"] = write_probe(
            model,
            built.tokenizer,
            recipe.options.probe_text,
            os.path.join(output_dir, PROBE_FILE),
            device=trainer.accelerator.device,
        )
    extra = {"base_model": built.base_model_path, "wall_time_s": time.time() - started if started else None}
    if peaks is not None:
        extra["rss_anon_mib_by_rank"] = gather_objects(peaks.report())  # collective
    summary = summarize(recipe.task, trainer, files, extra)
    files["summary"] = write_summary(summary, output_dir)
    if rank() == 0:
        trainer.accelerator.print(f"boft-plugin {recipe.task}: adapter written to {output_dir}")
    return RunResult(trainer=trainer, summary=summary, output_dir=output_dir)


__all__ = ["Prepared", "RecipeError", "RunResult", "finish", "make_trainer", "prepare", "run", "sync_reference_adapter"]
