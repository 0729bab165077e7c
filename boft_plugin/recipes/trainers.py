"""TRL's SFT, DPO, KTO, GRPO and RLOO trainers with boft-plugin's behaviour added through a mixin and callbacks.

No Trainer method is replaced on an instance. Two places step into TRL objects: :func:`_keep_existing_reference`,
which, for the length of the constructor of a trainer with a reference adapter only, makes the model's
``add_adapter`` skip TRL's own ``ref`` adapter when the engine already added it (FSDP2 cannot manage an adapter added
after sharding); and, with ``use_vllm``, the class of TRL's ``vllm_generation`` object is set to a subclass whose
weight iterator streams the merged BOFT weights (``recipes.vllm_sync``).

:class:`BoftTrainerMixin` adds, to any transformers ``Trainer`` subclass:

- kill-safe, owned checkpoints: each ``checkpoint-N`` is marked started before the Trainer writes it and complete
  after every rank wrote it; only the run's own checkpoints are ever rotated away (``checkpoints.markers``);
- ``resume_from_checkpoint`` resolved by ``checkpoints.resume.plan_resume`` (the newest complete checkpoint, the
  run's own unfinished ones removed, anything else it would write over refused), and DeepSpeed checkpoints written
  by another number of ranks loaded through the universal format;
- the engine's own hooks (``boft_plugin.distributed.engine.Engine``): after TRL wrapped the model, checkpoint
  save/load in the engine's format (FSDP2: ``torch.distributed.checkpoint``), resume on another world size;
- under accelerate's FSDP plugin (GPUs), ``boft_R`` held block-major so that FSDP2 shards whole blocks;
- with ``data_order.WorldSizeInvariantDataMixin``: the rows of each optimizer step do not depend on the number of
  ranks (``data_order_tail`` says what happens to an epoch's last partial global batch).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer, SFTTrainer

from ..distributed.engine import Engine, float32_adapters
from ..distributed.fsdp2.shard import is_fsdp2_sharded, store_block_major
from ..runtime.ranks import barrier, world_size
from .callbacks import LogMemory, NumericsGuardCallback, ReleaseFreedMemory, SyncReferenceAdapter
from .checkpoints.markers import (
    begin_checkpoint,
    complete_checkpoint,
    is_checkpoint_writer,
    resign,
    rotate,
    written_by_world_size,
)
from .checkpoints.resume import ResumePlan, agreed_resume_plan, carry_out
from .data_order import WorldSizeInvariantDataMixin
from .dpo_reference import REFERENCE_ADAPTER

__all__ = [
    "BoftDPOTrainer",
    "BoftGRPOTrainer",
    "BoftKTOTrainer",
    "BoftRLOOTrainer",
    "BoftSFTTrainer",
    "BoftTrainerMixin",
]


class BoftTrainerMixin:
    """Put first in the bases of a transformers ``Trainer`` subclass (see the module docstring)."""

    def __init__(
        self,
        *args,
        data_order_tail: str = "drop",
        resume_plan: ResumePlan | None = None,
        engine: Engine | None = None,
        **kwargs,
    ):
        self.data_order_tail = data_order_tail  # read by WorldSizeInvariantDataMixin when the loader is built
        self.boft_resume_plan = resume_plan  # decided before loading (train.prepare), else in train()
        self.boft_lineage: str | None = None
        super().__init__(*args, **kwargs)
        if getattr(self.model, "is_loaded_in_4bit", False) or getattr(self.model, "is_loaded_in_8bit", False):
            # TRL casts every trainable parameter of a quantised model to bf16 (QLoRA's recipe); a bf16 boft_s
            # cannot move by less than 2**-8, so BOFT's adapters go back to float32 before the optimizer exists
            float32_adapters(self.model)
        self.boft_engine = engine if engine is not None else _engine_of_trainer(self)
        self.boft_engine.after_wrap(self.model)
        # rotation happens after the completion marker (_save_checkpoint), so it only counts complete, own checkpoints
        self.boft_keep_checkpoints, self.args.save_total_limit = self.args.save_total_limit, None
        self.add_callback(LogMemory())
        self.add_callback(NumericsGuardCallback())
        for callback in self.boft_engine.trainer_callbacks():
            self.add_callback(callback)
        if self.boft_engine.device().type == "cpu":  # glibc heap tuning helps CPU runs; GPU hosts keep defaults
            self.add_callback(ReleaseFreedMemory())
        if getattr(self, "is_fsdp_enabled", False):  # accelerate's FSDP2 plugin shards every parameter on dim 0
            store_block_major(self.model)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        plan = self.boft_resume_plan or agreed_resume_plan(resume_from_checkpoint, self.args.output_dir)
        self.boft_resume_plan = None  # carried out once; a later train() call decides again
        carry_out(plan, is_checkpoint_writer(self.args.save_on_each_node))
        self.boft_lineage = plan.lineage
        checkpoint = plan.checkpoint
        written_by = written_by_world_size(checkpoint) if checkpoint else None
        self.boft_engine.prepare_resume(self, checkpoint, written_by, after_convert=resign)
        return super().train(checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, marked started (pending) before anything is written and complete after every
        rank wrote its part; then the run's own older checkpoints are rotated (``save_total_limit``)."""
        checkpoint = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.boft_lineage is None:  # saved outside train(): a checkpoint series of its own
            self.boft_lineage = uuid.uuid4().hex
        lineage = self.boft_lineage
        writer = is_checkpoint_writer(self.args.save_on_each_node)
        nonce = begin_checkpoint(checkpoint, lineage) if writer else None
        barrier()
        super()._save_checkpoint(model, trial)
        barrier()  # every rank has written its part
        if writer:
            complete_checkpoint(checkpoint, lineage, nonce, world_size())
            rotate(self.args.output_dir, self.boft_keep_checkpoints, lineage)
        barrier()

    def push_to_hub(
        self,
        commit_message="End of training",
        blocking=True,
        token=None,
        revision=None,
        private=None,
        *,
        include: list[str] | None = None,
        **kwargs,
    ):
        """The Trainer's ``push_to_hub`` with an allow-list: the adapter and tokenizer (``include``: the parts of
        ``recipes.hub.HUB_PATTERNS``; the recipe key ``hub_upload``), never checkpoints, merged models, config-built
        base models, probes or summaries unless named. The adapter is the one the run exported; it is saved again
        only when the run did not export it."""
        from transformers.trainer import hf_api

        from .hub import hub_patterns

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        if not getattr(self, "boft_exported", False):
            self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else Path(self.args.output_dir).name
        self.create_model_card(model_name=kwargs.pop("model_name", name), **kwargs)
        self._finish_current_push()
        return hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            allow_patterns=hub_patterns(include if include is not None else ["adapter", "tokenizer"]),
            ignore_patterns=[".*", "_*", "checkpoint-*"],
            revision=revision if revision is not None else self.args.hub_revision,
        )

    # -- engines that shard before the Trainer (FSDP2): their own checkpoint format ------------------------------
    def save_model(self, output_dir=None, _internal_call=False):
        if not self.boft_engine.shards_model:
            return super().save_model(output_dir, _internal_call)
        from ..export import export_adapter

        export_adapter(self.model, output_dir or self.args.output_dir)  # collective, gathered, rank 0 writes
        return None

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.boft_engine.save_state(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.boft_engine.shards_model:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        return None  # the adapter comes back with the optimizer, from the engine's state (below)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self.boft_engine.load_state(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)


class BoftSFTTrainer(BoftTrainerMixin, WorldSizeInvariantDataMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with :class:`BoftTrainerMixin` and a world-size-invariant data order."""


class _ExactReferenceAdapter:
    """For TRL's trainers with a reference model (DPO, KTO, GRPO / RLOO): an exact BOFT ``ref`` adapter.

    Given a ``PeftModel`` (an init adapter), TRL adds a ``ref`` copy of it, synced by
    ``callbacks.SyncReferenceAdapter`` (TRL copies only ``*.default.*`` parameters). Under FSDP2 pre-sharding the
    builder has added (and synced) ``ref`` before sharding, since FSDP2 cannot manage an adapter added later; TRL's
    constructor adds ``ref`` unconditionally, so for that one call the existing adapter is kept. This is the only
    place where boft-plugin steps into a TRL call. A fresh adapter's reference is the adapter-disabled base (TRL's
    own ``use_adapter(model, None)``): no second model.
    """

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = [*(callbacks or []), SyncReferenceAdapter()]
        model = kwargs.get("model", args[0] if args else None)
        with _keep_existing_reference(model):
            super().__init__(*args, callbacks=callbacks, **kwargs)


class _ReferenceFirstUnderZero3(_ExactReferenceAdapter):
    """DPO / KTO, whose reference pass runs between the policy forward and its backward: under ZeRO-3 it runs first
    (see :meth:`BoftDPOTrainer._compute_loss`). GRPO / RLOO score the reference while preparing a generation batch,
    before any policy forward, and need nothing of this."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.boft_reference_first = self.boft_engine.name == "zero3"

    @contextlib.contextmanager
    def _reference_in_inputs(self):
        """TRL's switch for "the reference log-probs are in the inputs", on for one loss computation."""
        self.precompute_ref_logps = True
        try:
            yield
        finally:
            self.precompute_ref_logps = False

    def _reference_first(self) -> bool:
        return self.boft_reference_first and not self.precompute_ref_logps


class BoftDPOTrainer(_ReferenceFirstUnderZero3, BoftTrainerMixin, WorldSizeInvariantDataMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with :class:`BoftTrainerMixin` and an exact BOFT reference adapter."""

    def _compute_loss(self, model, inputs, return_outputs):
        """Under ZeRO-3, the reference log-probs of a step are computed before its policy forward, not after it.

        TRL runs policy forward -> reference forward (no grad, same modules) -> backward. ZeRO-3 counts per module,
        in a forward pre-hook, the inputs that will receive gradients and releases the module's gathered parameters
        when that count returns to 0 in backward; the no-grad reference forward resets the counts, so no module is
        released in backward and the whole model ends up gathered on every rank (measured: +2.6 GiB per rank on a
        0.9B model). The reference values are the same either way (no grad, reference adapter, no dropout).
        """
        if not self._reference_first() or "ref_chosen_logps" in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        chosen, rejected = self.compute_ref_log_probs(model, inputs)
        inputs = dict(inputs, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
        with self._reference_in_inputs():
            return super()._compute_loss(model, inputs, return_outputs)


class BoftKTOTrainer(_ReferenceFirstUnderZero3, BoftTrainerMixin, WorldSizeInvariantDataMixin, KTOTrainer):
    """TRL's ``KTOTrainer`` with :class:`BoftTrainerMixin` and an exact BOFT reference adapter (as DPO).

    The rows of a step do not depend on the number of ranks, but KTO's loss does: its KL baseline is the mean over
    ranks of per-micro-batch estimates, and TRL pairs each completion with its neighbour's prompt within groups of
    ``per_device_train_batch_size`` rows (docs/trl.md).
    """

    def _compute_loss(self, model, inputs, return_outputs):
        """Under ZeRO-3, the reference log-probs first, as :meth:`BoftDPOTrainer._compute_loss` explains."""
        if not self._reference_first() or "ref_logps" in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        completion, kl = self.compute_ref_log_probs(model, inputs)
        inputs = dict(inputs, ref_logps=completion, **({"ref_KL_logps": kl} if kl is not None else {}))
        with self._reference_in_inputs():
            return super()._compute_loss(model, inputs, return_outputs)


class _GenerationUnderEngines:
    """GRPO / RLOO: each generation inside the engine's :meth:`~boft_plugin.distributed.engine.Engine.generating`
    (FSDP2: the root unit's own parameters gathered, the ranks kept in step; ``recipes.generation``), and with
    ``use_vllm`` the weight sync streamed from the merged BOFT weights (``recipes.vllm_sync``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .vllm_sync import stream_weight_sync

        stream_weight_sync(self)

    def _generate_single_turn(self, *args, **kwargs):
        if self.use_vllm:  # vLLM generates from the synced weights; the model only streams them (recipes.vllm_sync)
            return super()._generate_single_turn(*args, **kwargs)
        with self.boft_engine.generating(self.model_wrapped):
            return super()._generate_single_turn(*args, **kwargs)


class BoftGRPOTrainer(_GenerationUnderEngines, _ExactReferenceAdapter, BoftTrainerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with :class:`BoftTrainerMixin`, an exact BOFT reference adapter when ``beta`` != 0 (a
    copy of the init adapter; under FSDP2 also of a fresh one, added before sharding), and generation under every
    engine. The rows of a step are TRL's: its seeded
    ``RepeatSampler`` gives every rank the same order, split into whole generation batches."""


class BoftRLOOTrainer(_GenerationUnderEngines, _ExactReferenceAdapter, BoftTrainerMixin, RLOOTrainer):
    """TRL's ``RLOOTrainer``, as :class:`BoftGRPOTrainer`."""


def _engine_of_trainer(trainer) -> Engine:
    """The engine of a trainer built without one (a user's own script): read from what accelerate set up."""
    from ..distributed.replicated import ReplicatedEngine

    if is_fsdp2_sharded(trainer.model):
        from ..distributed.fsdp2 import FSDP2Engine

        return FSDP2Engine()
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        from ..distributed.zero import ZeroEngine

        return ZeroEngine(plugin.zero_stage)
    return ReplicatedEngine("ddp" if trainer.args.world_size > 1 else "single")


@contextlib.contextmanager
def _keep_existing_reference(model):
    from peft import PeftModel

    if not isinstance(model, PeftModel) or REFERENCE_ADAPTER not in model.peft_config:
        yield
        return
    original = model.add_adapter

    def add_adapter(adapter_name, peft_config, *args, **kwargs):
        if adapter_name == REFERENCE_ADAPTER:
            return None
        return original(adapter_name, peft_config, *args, **kwargs)

    model.add_adapter = add_adapter
    try:
        yield
    finally:
        del model.add_adapter
