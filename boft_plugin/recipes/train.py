"""Train a recipe: the output directory locked, checks without weights, build, TRL's trainer, export on every rank.

``run(recipe)`` is what ``boft-plugin sft|dpo`` calls on each rank (under ``torch.distributed.run``, ``accelerate
launch`` with any of ``integrations/accelerate/*.yaml``, or one process), top to bottom:

1. :func:`locked_output_dir`: the run lock on ``output_dir`` (one run at a time; every node must see the same
   directory), stale staging entries of this host's dead processes removed;
2. :func:`.plan.prepare`: data, model config, geometry, tokenizer, output directory and resume point, no weights;
3. :func:`.builder.build`: this rank's part of the model;
4. :func:`make_trainer` and ``trainer.train``;
5. :func:`finish`: adapter (+ tokenizer), single-factor adapter, merged model, probe, summary; ``push_to_hub``.

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

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..export import export_adapter
from ..runtime.atomic import remove_stale_staging
from ..runtime.process_memory import PhasePeaks, limit_heap_retention, malloc_trim
from ..runtime.ranks import gather_objects, log, raise_if_any_rank_failed
from ..runtime.run_lock import RunLock, check_every_rank_sees
from .builder import Built, build
from .checkpoints.markers import is_checkpoint_writer
from .dpo_reference import sync_reference_adapter
from .outputs import (
    PROBE_FILE,
    SINGLE_FACTOR_DIR,
    export_lora_adapter,
    export_merged_model,
    summarize,
    write_probe,
    write_summary,
)
from .plan import RunPlan, prepare
from .quantisation import describe_quantisation, quantisation_config


@contextlib.contextmanager
def locked_output_dir(training) -> Iterator[None]:
    """Collective: hold the run lock on ``training.output_dir`` for the run (see :mod:`boft_plugin.runtime.run_lock`).

    The checkpoint writer (rank 0; each node's local rank 0 with ``save_on_each_node``) takes it; then every rank
    must see rank 0's lock, so that markers, rotation and exports written on rank 0's disk are the ones every node
    reads. A directory the run created and left empty (a refused recipe) is removed again.
    """
    output_dir = Path(training.output_dir)
    existed = output_dir.exists()
    writer = is_checkpoint_writer(training.save_on_each_node)
    lock, error = None, None
    if writer:
        try:
            lock = RunLock(output_dir).acquire()
            remove_stale_staging(output_dir)
        except (RecipeError, OSError) as err:
            error = err if isinstance(err, RecipeError) else RecipeError(f"output_dir {output_dir}: {err}")
    raise_if_any_rank_failed(error)
    try:
        if not training.save_on_each_node:
            from ..runtime.ranks import broadcast_object

            run_id = broadcast_object(lock.run_id if lock is not None else None)
            blind = check_every_rank_sees(output_dir, run_id)
            if blind:
                where = ", ".join(f"rank {r} on {host}" for r, host in blind)
                raise RecipeError(
                    f"output_dir {output_dir} is not the same directory on every node ({where} cannot see the run "
                    "lock rank 0 wrote there): markers, rotation and exports happen on rank 0's disk. Put output_dir "
                    "on a filesystem every node shares, or set save_on_each_node: true"
                )
        yield
    finally:
        if lock is not None:
            lock.release()
            with contextlib.suppress(OSError):
                if not existed and not any(output_dir.iterdir()):
                    output_dir.rmdir()


def make_trainer(plan: RunPlan, built: Built):
    """boft-plugin's TRL ``SFTTrainer`` / ``DPOTrainer`` / ``KTOTrainer`` / ``GRPOTrainer`` / ``RLOOTrainer`` for
    ``built`` (see :func:`.builder.build`)."""
    from .trainers import BoftDPOTrainer, BoftGRPOTrainer, BoftKTOTrainer, BoftRLOOTrainer, BoftSFTTrainer

    recipe = plan.recipe
    common = dict(
        model=built.model,
        args=recipe.training,
        train_dataset=plan.train_dataset,
        eval_dataset=plan.eval_dataset,
        processing_class=built.tokenizer,
        peft_config=built.peft_config,
        data_order_tail=recipe.options.data_order_tail,
        resume_plan=plan.resume,
        engine=built.engine,
    )
    if recipe.task == "sft":
        return BoftSFTTrainer(**common)
    if recipe.task == "kto":
        return BoftKTOTrainer(**common)
    if recipe.task in ("grpo", "rloo"):
        trainer_class = BoftGRPOTrainer if recipe.task == "grpo" else BoftRLOOTrainer
        del common["data_order_tail"]  # TRL's own sampler (whole generation batches)
        return trainer_class(reward_funcs=list(plan.reward_funcs), **common)
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
    limit_heap_retention()  # CPU-only hosts: freed weight-sized blocks go back to the OS (runtime.process_memory)
    for note in recipe.notes:
        log(note)
    with locked_output_dir(recipe.training), PhasePeaks() as peaks:  # per-phase peak memory, in the summary
        peaks.phase("prepare")
        plan = prepare(recipe, train_dataset, eval_dataset)
        peaks.phase("load")
        built = build(plan)
        malloc_trim()  # what loading freed (whole tensors read once, construction buffers) goes back to the OS
        peaks.phase("train")
        trainer = make_trainer(plan, built)
        trainer.train(resume_from_checkpoint=plan.resume.checkpoint)
        result = finish(plan, trainer, built, started, peaks)
        if recipe.training.push_to_hub:
            trainer.push_to_hub(dataset_name=recipe.script.dataset_name, include=recipe.options.hub_upload)
    if end and hasattr(trainer, "end"):
        trainer.end()
    return result


def finish(plan: RunPlan, trainer, built: Built, started: float | None = None, peaks: PhasePeaks | None = None):
    """End of run on every rank: export the adapter with the tokenizer, single-factor adapter, merged model, the probe
    logits, the summary. Returns a :class:`RunResult`."""
    recipe = plan.recipe
    output_dir = recipe.training.output_dir
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    trainer.boft_engine.release(trainer)  # what the engine still holds gathered, before the exports gather
    from ..distributed.gather import unwrap_peft_model

    adapter = unwrap_peft_model(model).active_adapters[0]
    phase = peaks.phase if peaks is not None else (lambda name: None)
    phase("export_adapter")
    tokenizer = built.tokenizer
    files: dict[str, Any] = {
        "adapter": export_adapter(
            model, output_dir, adapter_names=[adapter], extra_files=lambda staging: tokenizer.save_pretrained(staging)
        )
    }
    trainer.boft_exported = True  # push_to_hub uploads this export instead of saving again
    if recipe.options.export_single_factor:
        phase("export_single_factor")
        files["single_factor"] = export_adapter(
            model, os.path.join(output_dir, SINGLE_FACTOR_DIR), adapter_names=[adapter], single_factor=True
        )
    if recipe.options.export_merged:
        phase("export_merged")
        files["merged"] = export_merged_model(model, output_dir, tokenizer=built.tokenizer)
    lora_options = recipe.options.lora_options()
    if lora_options is not None:
        phase("export_lora")
        files["lora"] = export_lora_adapter(model, output_dir, lora_options, tokenizer)
    if recipe.options.probe_text:
        phase("probe")
        files["probe"] = write_probe(
            model,
            built.tokenizer,
            recipe.options.probe_text,
            os.path.join(output_dir, PROBE_FILE),
            device=trainer.accelerator.device,
        )
    extra = {
        "base_model": built.base_model_path,
        "base_quantisation": describe_quantisation(quantisation_config(recipe.model)),
        "engine": trainer.boft_engine.name,
        "wall_time_s": time.time() - started if started else None,
    }
    if peaks is not None:
        extra["rss_anon_mib_by_rank"] = gather_objects(peaks.report())  # collective
    summary = summarize(recipe.task, trainer, files, extra)
    files["summary"] = write_summary(summary, output_dir)
    log(f"{recipe.task}: adapter written to {output_dir}")
    return RunResult(trainer=trainer, summary=summary, output_dir=output_dir)


__all__ = [
    "RecipeError",
    "RunPlan",
    "RunResult",
    "finish",
    "locked_output_dir",
    "make_trainer",
    "prepare",
    "run",
    "sync_reference_adapter",
]
