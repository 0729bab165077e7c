"""Trainer callbacks the recipes install: memory in the logs and returned to the OS, DPO's exact reference."""

from __future__ import annotations

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


class ReleaseFreedMemory(TrainerCallback):
    """After every optimizer step, give the heap memory freed during the step back to the OS (``malloc_trim``).

    Gathered parameters, gradients and activations are freed at the end of a step but small blocks stay in glibc's
    heap; measured on a 0.9B model under ZeRO-3 on 2 ranks, trimming keeps ~0.3 GiB per rank from accumulating.
    """

    def on_step_end(self, args, state, control, **kwargs):
        from ..runtime.process_memory import malloc_trim

        malloc_trim()
        return control


class SyncReferenceAdapter(TrainerCallback):
    """At the end of the Trainer's constructor, make TRL's DPO ``ref`` adapter an exact copy of ``default``.

    TRL adds ``ref`` to a ``PeftModel`` it is given and copies only parameters named ``*.default.*``; BOFT's are
    ``*.boft_R.default``, so without this the reference would stay at the identity (the base model, not the adapter
    DPO continues from). ``on_init_end`` runs inside ``Trainer.__init__``, after TRL added ``ref`` and before it
    may use it (``precompute_ref_log_probs``).
    """

    def on_init_end(self, args, state, control, model=None, **kwargs):
        from .dpo_reference import sync_reference_adapter

        if model is not None:
            sync_reference_adapter(model)
        return control
