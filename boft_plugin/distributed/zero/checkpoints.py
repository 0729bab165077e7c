"""DeepSpeed (ZeRO-1/2/3) resume on another number of ranks, through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint holds one optimizer partition per rank and DeepSpeed refuses to load it on another world size.
Rank 0 converts it once (``deepspeed.checkpoint.ds_to_universal``, written next to the original, which is left
untouched) and the engine is told to load that; the Trainer then resumes as usual (scheduler, RNG, data position).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ...errors import RecipeError
from ...runtime.atomic import atomic_directory, atomic_write_text
from ...runtime.ranks import barrier, log, rank, world_size


def _convert_to_universal(checkpoint: Path, tag: str, after: Callable[[Path], None] | None) -> None:
    """Rank 0: ``checkpoint/<tag>`` -> ``checkpoint/<tag>_universal`` (written atomically), then
    ``latest_universal`` naming it (what DeepSpeed reads when ``load_universal`` is on)."""
    final = checkpoint / f"{tag}_universal"
    if not final.is_dir():
        with atomic_directory(final) as staging:
            _run_ds_to_universal(checkpoint / tag, staging)
    atomic_write_text(checkpoint / "latest_universal", final.name)
    if after is not None:
        after(checkpoint)


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


def prepare_universal_resume(
    trainer, checkpoint: str | None, written_by: int | None, after_convert: Callable[[Path], None] | None = None
) -> None:
    """Let a DeepSpeed run resume from a checkpoint written by a different number of ranks.

    A ZeRO checkpoint holds one optimizer partition per rank and DeepSpeed refuses to load it on another world
    size. Rank 0 converts it once to DeepSpeed's universal format (per-parameter fp32 weights and optimizer
    moments, written next to the original, which is left untouched) and the engine is told to load that; the
    Trainer then resumes as usual (scheduler, RNG, data position). Same world size: nothing to do.
    ``written_by``: how many ranks wrote ``checkpoint`` (None: unknown, loaded as it is); ``after_convert`` runs on
    rank 0 once the universal form was written into the checkpoint. Call before ``trainer.train``; collective.
    """
    if checkpoint is None or not getattr(trainer, "is_deepspeed_enabled", False):
        return
    if written_by is None or written_by == world_size():
        return
    checkpoint = Path(checkpoint)
    try:
        tag = (checkpoint / "latest").read_text().strip()
    except OSError as err:
        raise RecipeError(f"{checkpoint} has no DeepSpeed 'latest' file; it was not written under DeepSpeed") from err
    log(
        f"{checkpoint} was written by {_ranks(written_by)}, resuming on {world_size()}: loading it through "
        "DeepSpeed's universal checkpoint format"
    )
    if rank() == 0:
        _convert_to_universal(checkpoint, tag, after_convert)
    barrier()
    plugin = trainer.accelerator.state.deepspeed_plugin
    plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
