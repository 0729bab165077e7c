"""What a run resumes from, which earlier checkpoints it may remove, and which it must refuse to write over.

One decision, :func:`plan_resume`, made before anything is loaded (``train.prepare``) and carried out when training
starts (``trainers.BoftTrainerMixin.train``):

- ``resume_from_checkpoint: auto`` (or ``true`` / ``last`` / ``latest``): the newest checkpoint in ``output_dir`` that
  is complete: by boft-plugin's completion marker, or, for a checkpoint another script wrote (a stock Trainer, TRL
  alone), by the Trainer's own standard (trainer state of that step, weights, optimizer, scheduler). None: start
  afresh. A path: that checkpoint, which must be complete the same way.
- The run continues the *lineage* (the owning run) of the newest checkpoint boft-plugin marked in ``output_dir``; a
  fresh run starts a new one.
- Every ``checkpoint-N`` newer than the resumed step would be written over when training reaches step N. The run's
  own unfinished ones (same lineage, never marked complete) are removed; anything else newer (another run's, a stock
  Trainer's, a complete one) is refused in one line, unless ``overwrite_output_dir`` says the Trainer may write over
  it (nothing is removed then either).
- Checkpoint trust: a checkpoint whose completion marker does not verify for this user (:mod:`.signing`) and whose
  resume unpickles files (DeepSpeed, torch.distributed.checkpoint: :func:`.markers.pickled_parts`) needs
  ``trust_checkpoint: true``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import RecipeError
from .markers import CheckpointInfo, pickled_parts, scan_checkpoints, step_of, trainer_missing

__all__ = ["ResumePlan", "agreed_resume_plan", "carry_out", "plan_resume", "wants_resume"]

_AUTO = ("true", "last", "latest", "auto")


def wants_resume(value) -> bool:
    """Whether a ``resume_from_checkpoint`` value asks to resume at all."""
    return value not in (None, False, "", "false", "False")


@dataclass
class ResumePlan:
    """The outcome of :func:`plan_resume` (plain data: it is broadcast from rank 0 to every rank)."""

    checkpoint: str | None  # what Trainer.train resumes from (None: afresh)
    lineage: str  # the run that owns the checkpoints this run writes
    remove: list[str] = field(default_factory=list)  # this lineage's unfinished checkpoints newer than the resume
    trusted: bool = True  # the resumed checkpoint was signed for this user (or needs no unpickling)
    note: str = ""

    @property
    def step(self) -> int:
        return 0 if self.checkpoint is None else step_of(self.checkpoint)


def _checked_choice(info: CheckpointInfo, trust: bool, key: str) -> bool:
    """Whether ``info`` can be resumed (raises for a checkpoint named explicitly); returns ``trusted``."""
    if info.ours and not info.complete:
        raise RecipeError(
            f"recipe key '{key}': {info.path} is incomplete (boft-plugin started it but no rank finished it: the run "
            "was killed while writing it); resume with resume_from_checkpoint: auto (the newest complete one)"
        )
    if info.ours and info.signed:
        return True
    missing = trainer_missing(info.path)
    if missing:
        raise RecipeError(
            f"recipe key '{key}': {info.path} is not a complete checkpoint (it lacks {'; '.join(missing)})"
        )
    pickled = pickled_parts(info.path)
    if pickled and not trust:
        who = "its completion marker does not verify for this user" if info.ours else "boft-plugin did not write it"
        raise RecipeError(
            f"recipe key '{key}': {info.path} would be unpickled to resume ({', '.join(pickled)}), which runs any code "
            f"it contains, and {who}. Set trust_checkpoint: true only if you trust where it came from"
        )
    return not pickled


def plan_resume(value, output_dir: str | os.PathLike, *, overwrite: bool = False, trust: bool = False) -> ResumePlan:
    """Decide the resume (reads markers and file names only; changes nothing). Raises :class:`RecipeError`."""
    key = "resume_from_checkpoint"
    found = scan_checkpoints(output_dir)
    marked = [c for c in found if c.ours]
    lineage = marked[-1].lineage if marked and wants_resume(value) else None
    chosen: CheckpointInfo | None = None
    trusted = True
    if not wants_resume(value):
        pass
    elif isinstance(value, bool) or str(value).lower() in _AUTO:
        for info in reversed(found):
            resumable = info.complete if info.ours else not trainer_missing(info.path)
            if resumable:
                chosen = info
                break
        if chosen is not None:
            trusted = _checked_choice(chosen, trust, key)
    else:
        path = Path(value)
        if not path.is_dir():
            raise RecipeError(f"recipe key '{key}': {path} does not exist")
        try:
            step_of(path)
        except ValueError:
            raise RecipeError(f"recipe key '{key}': {path} is not a checkpoint-N directory") from None
        chosen = CheckpointInfo.read(path)
        trusted = _checked_choice(chosen, trust, key)
        inside = path.resolve().parent == Path(output_dir).resolve()
        lineage = chosen.lineage if chosen.ours and inside else None
    if chosen is not None and chosen.ours:
        lineage = chosen.lineage
    lineage = lineage or uuid.uuid4().hex
    start = 0 if chosen is None else chosen.step
    remove, blocking = [], []
    for info in found:
        if info.step <= start:
            continue
        if info.owned_by(lineage) and not info.complete:
            remove.append(str(info.path))
        else:
            blocking.append(info)
    if blocking and not overwrite:
        many = len(blocking) > 1
        what = f"checkpoints ({', '.join(c.path.name for c in blocking)})" if many else blocking[0].path.name
        when = "and this run starts afresh" if chosen is None else f"newer than {chosen.path.name}, which it resumes"
        them = "them" if many else "it"
        raise RecipeError(
            f"output_dir {output_dir} holds {what} {when}: training would write over {them} on reaching "
            f"{'those steps' if many else 'that step'}; nothing was written. Resume from the newest with "
            f"resume_from_checkpoint: auto, move {them} out of output_dir, choose another output_dir, or set "
            f"overwrite_output_dir: true to let the Trainer write over {them}"
        )
    if chosen is None:
        note = f"no complete checkpoint in {output_dir}: starting afresh" if wants_resume(value) else ""
    else:
        who = "" if chosen.ours else " (written without boft-plugin; complete by the Trainer's standard)"
        note = f"resuming from {chosen.path}{who}"
    if remove:
        note += f" (removing this run's unfinished {', '.join(Path(p).name for p in remove)})"
    return ResumePlan(None if chosen is None else str(chosen.path), lineage, remove, trusted, note)


def agreed_resume_plan(value, output_dir, *, overwrite: bool = False, trust: bool = False) -> ResumePlan:
    """Collective: :func:`plan_resume` decided on rank 0 (whose disk and signing key count) and known to every rank;
    a refusal is raised on every rank."""
    from ...runtime.ranks import broadcast_object, raise_if_any_rank_failed, rank

    plan, error = None, None
    if rank() == 0:
        try:
            plan = plan_resume(value, output_dir, overwrite=overwrite, trust=trust)
        except RecipeError as err:
            error = err
    raise_if_any_rank_failed(error)
    return broadcast_object(plan)


def carry_out(plan: ResumePlan, writer: bool) -> None:
    """Collective: the checkpoint writer(s) remove the lineage's unfinished checkpoints the plan names; rank 0 says
    what is resumed. Every rank waits until it is done."""
    import shutil

    from ...runtime.ranks import barrier, log

    if writer:
        for path in plan.remove:
            shutil.rmtree(path, ignore_errors=True)
    if plan.note:
        log(plan.note)
    barrier()
