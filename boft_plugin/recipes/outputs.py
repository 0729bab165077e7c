"""What a recipe run writes at the end: the adapter, the merged model, a LoRA form, probe logits and a JSON summary.

All functions are collective where the model is sharded (every rank calls them); only global rank 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..export.layout import LORA_DIR, MERGED_DIR, PROBE_FILE, SINGLE_FACTOR_DIR, SUMMARY_FILE

__all__ = [
    "LORA_DIR",
    "MERGED_DIR",
    "PROBE_FILE",
    "SINGLE_FACTOR_DIR",
    "SUMMARY_FILE",
    "export_lora_adapter",
    "export_merged_model",
    "summarize",
    "write_probe",
    "write_summary",
]


def export_lora_adapter(model, output_dir: str | os.PathLike, options, tokenizer=None) -> Path | None:
    """``boft_plugin.export_lora`` to ``<output_dir>/lora`` with the tokenizer (collective); the directory on rank 0."""
    from ..export import export_lora

    def write_tokenizer(staging: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    target = Path(output_dir) / LORA_DIR
    report = export_lora(
        model,
        target,
        rank=options.rank,
        max_error=options.max_error,
        max_rank=options.max_rank,
        ranks=options.ranks,
        extra_files=write_tokenizer,
    )
    return target if report is not None else None


def export_merged_model(model, output_dir: str | os.PathLike, tokenizer=None) -> Path | None:
    """``boft_plugin.export_merged`` to ``<output_dir>/merged``, the tokenizer published with it (a complete folder)."""
    from ..export import export_merged

    def write_tokenizer(staging: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    return export_merged(model, Path(output_dir) / MERGED_DIR, extra_files=write_tokenizer)


def write_probe(model, tokenizer, text: str, path: str | os.PathLike, device=None) -> Path | None:
    """Run the trained model (eval mode, no grad) on ``text`` and save ids, float32 logits and the compute dtype.

    The forward is the model's own, not accelerate's autocast wrapper (``bf16: true``), so an autocast run's probe is
    computed in float32 like any reload; runs whose weights compute in bf16 (FSDP2 ``param_dtype``, DeepSpeed
    ``bf16``) record ``compute_dtype`` so that ``verify`` compares them with a bf16 tolerance.
    Collective under ZeRO-3 / FSDP2 (the forward gathers parameters): every rank calls it.
    """
    import torch

    from ..distributed.gather import unwrap_peft_model
    from ..runtime.ranks import barrier, rank

    peft_model = unwrap_peft_model(model)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if device is None:
        device = next(iter(peft_model.parameters())).device
    was_training = peft_model.training
    peft_model.eval()
    if "_original_forward" in peft_model.__dict__:  # accelerate's autocast wrapper: take it off (end of the run)
        from accelerate.utils import extract_model_from_parallel

        extract_model_from_parallel(peft_model, keep_fp32_wrapper=False)
    try:
        with torch.no_grad():
            raw = peft_model(input_ids=ids.to(device)).logits  # through __call__: FSDP2's hooks gather
    finally:
        peft_model.train(was_training)
    if rank() == 0:
        from ..runtime.atomic import atomic_file

        probe = {"text": text, "input_ids": ids, "logits": raw.float().cpu(), "compute_dtype": str(raw.dtype)}
        quantisation = getattr(peft_model.get_base_model().config, "quantization_config", None)
        if quantisation is not None:  # verify reloads the base quantised the same way (JSON: weights_only loads)
            as_dict = quantisation if isinstance(quantisation, dict) else quantisation.to_dict()
            probe["quantization_config"] = json.dumps(as_dict, default=str)
        with atomic_file(path) as staging:
            torch.save(probe, staging)
    barrier()
    return Path(path) if rank() == 0 else None


def _series(history: list[dict], key: str) -> list[list[float]]:
    return [[entry["step"], float(entry[key])] for entry in history if key in entry]


def summarize(task: str, trainer, files: dict[str, Any], extra: dict | None = None) -> dict:
    """The run's summary (losses, DPO / KTO reward margins, GRPO / RLOO rewards, files written) from the Trainer's
    log history."""
    history = list(trainer.state.log_history)
    evals = [entry for entry in history if "eval_loss" in entry]
    train_losses = _series(history, "loss")
    summary: dict[str, Any] = {
        "task": task,
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "train_loss": train_losses,
        "first_train_loss": train_losses[0][1] if train_losses else None,
        "last_train_loss": train_losses[-1][1] if train_losses else None,
        # evaluations are named by the step they ran at (step 0 only with eval_on_start), never "before"/"after"
        "evaluations": evals,
        "eval_first": evals[0] if evals else None,
        "eval_last": evals[-1] if len(evals) > 1 else None,
        "train_runtime": next((e["train_runtime"] for e in history if "train_runtime" in e), None),
        "files": {k: str(v) for k, v in files.items() if v is not None},
    }
    if task in ("dpo", "kto"):
        summary["train_margins"] = _series(history, "rewards/margins")
        summary["eval_margins"] = _series(history, "eval_rewards/margins")
    if task == "kto":
        summary["train_kl"] = _series(history, "kl")
    if task in ("grpo", "rloo"):  # the mean reward of each step's completions (all reward functions, weighted)
        summary["train_reward"] = _series(history, "reward")
        summary["eval_reward"] = _series(history, "eval_reward")
    summary["log_history"] = history
    summary.update(extra or {})
    return summary


def write_summary(summary: dict, output_dir: str | os.PathLike) -> Path | None:
    from ..runtime.ranks import rank

    if rank() != 0:
        return None
    from ..runtime.atomic import atomic_write_text

    return atomic_write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
