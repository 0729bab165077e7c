"""Trainer checkpoints that survive kills, and resuming from the last complete one, under any engine.

The Trainer writes ``checkpoint-N/`` in place (adapter, optimizer, scheduler, RNG, DeepSpeed shards, state) and
``resume_from_checkpoint=True`` takes the highest ``N`` found, complete or not; its own rotation may delete the
previous checkpoint before every rank has finished the new one. Here:

- :class:`CompleteCheckpoints` waits for every rank after each save, then rank 0 writes a completion marker
  (atomically) and only then rotates (``save_total_limit`` counts complete checkpoints; the Trainer's own
  rotation is switched off);
- :func:`resolve_resume` picks the newest *complete* checkpoint (a run killed during a save resumes from the one
  before), and removes incomplete ones newer than it;
- under FSDP2 (``fsdp2_pre_shard``), :func:`use_dcp_checkpoints` saves model and optimizer state with
  ``torch.distributed.checkpoint`` (every rank writes its shard; loading reshards, so a checkpoint written by W
  ranks resumes on W'), next to the gathered PEFT adapter;
- under DeepSpeed (ZeRO-1/2/3), :func:`prepare_deepspeed_resume` converts a checkpoint written by another number
  of ranks to DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``) once, next to the original,
  and has the engine load that instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..distributed.gather import barrier, rank, world_size
from .errors import RecipeError

COMPLETE_MARKER = "boft_checkpoint_complete.json"
DCP_DIR = "fsdp2_dcp"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), root / name) for name in os.listdir(root) if (m := _CHECKPOINT.match(name))]
    return sorted(p for p in found if p[1].is_dir())


def _read_marker(checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's completion marker ({} when absent or unreadable)."""
    try:
        marker = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether every rank finished writing this checkpoint (its completion marker is present and readable)."""
    return _read_marker(checkpoint).get("complete") is True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or None."""
    complete = [path for _, path in _checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a flushed temporary sibling renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_marker(checkpoint: Path, step: int) -> None:
    payload = {"complete": True, "step": step, "world_size": world_size(), "time": time.time()}
    _replace_file(checkpoint / COMPLETE_MARKER, json.dumps(payload))


def _rotate(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop older ones and incomplete ones older than the newest."""
    entries = _checkpoints(output_dir)
    complete = [step for step, path in entries if is_complete(path)]
    if not complete:
        return
    keep_steps = set(complete[-keep:]) if keep else set(complete)
    for step, path in entries:
        if step < complete[-1] and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


def _callback_class():
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        """After each save: wait for all ranks, mark the checkpoint complete, then rotate (rank 0)."""

        def __init__(self, keep: int | None):
            self.keep = keep

        def on_save(self, args, state, control, **kwargs):
            barrier()
            if rank() == 0:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                delay = float(os.environ.get("BOFT_PLUGIN_COMMIT_DELAY_S", "0") or 0)
                if delay:  # emulate a slow shared filesystem: widens the window a kill can hit (tests use it)
                    time.sleep(delay)
                _write_marker(checkpoint, state.global_step)
                _rotate(args.output_dir, self.keep)
            barrier()
            return control

    return CompleteCheckpoints


def _memory_callback():
    from transformers import TrainerCallback

    class LogMemory(TrainerCallback):
        """Adds this process's resident memory (``rss_mib``) to every log entry: a long run's should stay flat."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            import psutil

            rss = round(psutil.Process().memory_info().rss / 2**20, 1)
            if logs is not None:
                logs["rss_mib"] = rss
            if state.log_history:  # the Trainer stored this entry before calling back: add it there too
                state.log_history[-1]["rss_mib"] = rss

    return LogMemory()


def install(trainer) -> None:
    """Make ``trainer``'s checkpoints kill-safe (see module docstring); call before ``train()``."""
    keep = trainer.args.save_total_limit
    trainer.args.save_total_limit = None  # rotation happens after the completion marker, in the callback
    trainer.add_callback(_callback_class()(keep))
    trainer.add_callback(_memory_callback())


def resolve_resume(value, output_dir: str | os.PathLike):
    """Turn a recipe's ``resume_from_checkpoint`` into what ``Trainer.train`` takes.

    ``true`` / ``last`` / ``latest`` / ``auto``: the newest complete checkpoint in ``output_dir`` (None: start
    from scratch). A path: used as is, but refused if incomplete. Incomplete checkpoints newer than the one
    resumed from are removed (rank 0) so that the run can write them again.
    """
    if value in (None, False, "", "false", "False"):
        return None
    if isinstance(value, bool) or str(value).lower() in ("true", "last", "latest", "auto"):
        chosen = last_complete_checkpoint(output_dir)
    else:
        chosen = Path(value)
        if not chosen.is_dir():
            raise RecipeError(f"resume_from_checkpoint: {chosen} does not exist")
        if not is_complete(chosen):
            raise RecipeError(
                f"resume_from_checkpoint: {chosen} is incomplete (no {COMPLETE_MARKER}: the run was killed while "
                f"writing it); resume from {last_complete_checkpoint(chosen.parent) or 'scratch'} instead, e.g. "
                "with resume_from_checkpoint: auto"
            )
    if rank() == 0:
        newest_kept = -1 if chosen is None else int(_CHECKPOINT.match(chosen.name).group(1))
        dropped = []
        for step, path in _checkpoints(output_dir):
            if step > newest_kept and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
                dropped.append(path.name)
        where = f"resuming from {chosen}" if chosen else f"no complete checkpoint in {output_dir}: starting afresh"
        note = f" (removed incomplete {', '.join(dropped)})" if dropped else ""
        print(f"[boft-plugin] {where}{note}", flush=True)
    barrier()
    return None if chosen is None else str(chosen)


def use_dcp_checkpoints(trainer) -> None:
    """Save/load a FSDP2-sharded model's trainable state and optimizer with ``torch.distributed.checkpoint``.

    Replaces the Trainer's model/optimizer (de)serialisation for this trainer only: ``save_model`` writes the
    gathered PEFT adapter (collective), ``_save_optimizer_and_scheduler`` writes a DCP checkpoint of the adapter
    and optimizer shards plus the scheduler, and resuming loads them back, resharding to the current world size.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    from ..export import export_adapter

    options = StateDictOptions(ignore_frozen_params=True)  # the frozen base comes from the base model, not here
    load_options = StateDictOptions(ignore_frozen_params=True, strict=False)

    def model_and_optimizer():
        model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        return model, trainer.optimizer

    def save_model(output_dir=None, _internal_call=False):
        export_adapter(trainer.model, output_dir or trainer.args.output_dir)

    def save_optimizer_and_scheduler(output_dir):
        model, optimizer = model_and_optimizer()
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(output_dir, DCP_DIR))
        if rank() == 0 and trainer.lr_scheduler is not None:
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def load_from_checkpoint(resume_from_checkpoint, model=None):
        pass  # the adapter comes back with the optimizer, from the DCP shards (below)

    def load_optimizer_and_scheduler(checkpoint):
        if checkpoint is None:
            return
        model, optimizer = model_and_optimizer()
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, DCP_DIR))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=load_options
        )
        scheduler_file = os.path.join(checkpoint, "scheduler.pt")
        if trainer.lr_scheduler is not None and os.path.isfile(scheduler_file):
            trainer.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))

    trainer.save_model = save_model
    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    trainer._load_from_checkpoint = load_from_checkpoint
    trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler


def written_by_world_size(checkpoint: str | os.PathLike) -> int | None:
    """How many ranks wrote ``checkpoint`` (from its completion marker; None if it does not say)."""
    try:
        return int(_read_marker(checkpoint)["world_size"])
    except (KeyError, ValueError, TypeError):
        return None


def _convert_to_universal(checkpoint: Path, tag: str) -> None:
    """Rank 0: ``checkpoint/<tag>`` -> ``checkpoint/<tag>_universal`` (written through :mod:`boft_plugin.atomic`),
    then ``latest_universal`` naming it (what DeepSpeed reads when ``load_universal`` is on)."""
    from ..atomic import atomic_directory

    final = checkpoint / f"{tag}_universal"
    if not final.is_dir():
        with atomic_directory(final) as staging:
            _run_ds_to_universal(checkpoint / tag, staging)
    _replace_file(checkpoint / "latest_universal", final.name)


def _run_ds_to_universal(source: Path, output: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(output),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RecipeError(
            f"converting {source} to DeepSpeed's universal checkpoint format (to resume on another number of "
            f"ranks) failed with exit code {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )


def _ranks(count: int) -> str:
    return f"{count} rank" if count == 1 else f"{count} ranks"


def prepare_deepspeed_resume(trainer, checkpoint: str | None) -> None:
    """Let a DeepSpeed run resume from a checkpoint written by a different number of ranks.

    A ZeRO checkpoint holds one optimizer partition per rank and DeepSpeed refuses to load it on another world
    size. Rank 0 converts it once to DeepSpeed's universal format (per-parameter fp32 weights and optimizer
    moments, written next to the original, which is left untouched) and the engine is told to load that; the
    Trainer then resumes as usual (scheduler, RNG, data position). Same world size: nothing to do.
    Call before ``trainer.train``; collective (every rank calls it).
    """
    if checkpoint is None or not getattr(trainer, "is_deepspeed_enabled", False):
        return
    written_by = written_by_world_size(checkpoint)
    if written_by is None or written_by == world_size():
        return
    checkpoint = Path(checkpoint)
    try:
        tag = (checkpoint / "latest").read_text().strip()
    except OSError as err:
        raise RecipeError(f"{checkpoint} has no DeepSpeed 'latest' file; it was not written under DeepSpeed") from err
    if rank() == 0:
        print(
            f"[boft-plugin] {checkpoint} was written by {_ranks(written_by)}, resuming on {world_size()}: "
            "loading it through DeepSpeed's universal checkpoint format",
            flush=True,
        )
        _convert_to_universal(checkpoint, tag)
    barrier()
    plugin = trainer.accelerator.state.deepspeed_plugin
    plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
