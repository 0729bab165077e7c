"""Recipe mappings and data files that train in seconds on a tiny random Llama (tests and benchmarks only)."""

from __future__ import annotations

import os
from pathlib import Path

from ..runtime.atomic import write_jsonl
from ..toy.tasks import preference_examples, prompt_examples, sft_examples, unpaired_preference_examples

__all__ = ["check_verified", "read_summary", "tiny_recipe", "write_recipe", "write_tiny_data"]


def write_tiny_data(
    directory: str | os.PathLike, n_sft: int = 64, n_dpo: int = 32, n_kto: int = 32, n_prompts: int = 32
) -> dict[str, Path]:
    """Small SFT (plain prompt/completion), preference (DPO), unpaired (KTO) and prompt (GRPO / RLOO, the same file)
    files for quick runs; their paths by task."""
    directory = Path(directory)
    prompts = write_jsonl(prompt_examples(n_prompts, seed=4), directory / "prompts.jsonl")
    return {
        "sft": write_jsonl(sft_examples(n_sft, seed=0, fmt="prompt_completion"), directory / "sft.jsonl"),
        "dpo": write_jsonl(preference_examples(n_dpo, seed=1, conversational=False), directory / "dpo.jsonl"),
        "kto": write_jsonl(unpaired_preference_examples(n_kto, seed=3), directory / "kto.jsonl"),
        "grpo": prompts,
        "rloo": prompts,
    }


def tiny_recipe(task: str, output_dir: str | os.PathLike, data: dict[str, Path], **overrides) -> dict:
    """A recipe mapping that trains in seconds on a tiny random Llama (used by the tests).

    SFT: ``tiny_model`` with BOFT b=4, m=2 on all linear layers. DPO / KTO / GRPO / RLOO: set ``init_adapter`` (or
    ``tiny_model`` and ``boft_*`` keys) in ``overrides``; GRPO / RLOO score with
    :func:`boft_plugin.toy.rewards.alphabet_reward` (dense: a random model's groups differ). Evaluation (on a slice of
    the training file) runs at the start, midway and at the end.
    """
    recipe = {
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1.0e-2,
        "max_length": 32,
        "logging_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "eval_on_start": True,
        "save_strategy": "no",
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "probe_text": "reverse abcdef=",
        "dataset_name": str(data[task]),
        "eval_dataset_name": str(data[task]),
    }
    if task == "sft":
        recipe.update(tiny_model=True, boft_block_size=4, boft_n_butterfly_factor=2, boft_target_modules=["all-linear"])
    elif task in ("grpo", "rloo"):  # 2 prompts x 4 completions of up to 8 characters per step and rank
        del recipe["max_length"]
        recipe.update(
            beta=0.1,
            reward_funcs=["boft_plugin.toy.rewards.alphabet_reward"],
            num_generations=4,
            max_completion_length=8,
            per_device_eval_batch_size=8,
            eval_steps=3,
        )
    else:
        recipe.update(beta=0.1)
    recipe.update(overrides)
    return recipe


def write_recipe(path: str | os.PathLike, mapping: dict) -> str:
    """Write ``mapping`` as a recipe YAML file at ``path``; returns the path as a string (for ``--config``)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(mapping))
    return str(path)


def read_summary(output_dir: str | os.PathLike) -> dict:
    """A run's ``boft_run_summary.json``."""
    import json

    return json.loads((Path(output_dir) / "boft_run_summary.json").read_text())


def check_verified(*output_dirs: str | os.PathLike, factors: int = 2, tolerance: float = 1e-5) -> None:
    """``boft-plugin verify`` in a fresh process: each run's adapter (and merged model) matches stock PEFT's maths."""
    from ..export.verify import verify_in_fresh_process

    for report in verify_in_fresh_process(*output_dirs, timeout=300):
        assert report["ok"], report
        assert report["n_butterfly_factor"] == factors and report["oracle_rel_err"] < tolerance, report
        if "merged_rel_err" in report:
            assert report["merged_rel_err"] < tolerance, report
