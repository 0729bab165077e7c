"""The main job: BOFT SFT then DPO with TRL on 2 gloo ranks, exports reloaded with stock PEFT, no download.

    python -m boft_plugin.main_job [--workdir DIR]      (or: boft-plugin demo)

1. a tiny Llama "pretrained" locally to copy strings, with a local character tokenizer (``synthetic_tasks``);
2. a small SFT set (reverse the string, chat ``messages``) and a preference set (reversed over copied);
3. ``boft-plugin sft`` then ``boft-plugin dpo`` (starting from the SFT adapter) as recipes written to the
   workdir, each on 2 ranks with ``torch.distributed.run`` (gloo, 127.0.0.1), BOFT with 2 butterfly factors;
4. each run exports its adapter and a merged model; a FRESH process reloads them with stock PEFT (its real m=2
   maths) and plain transformers and compares the logits with those the training run saved;
5. a summary (losses, DPO reward margins, reload errors, files) and ``loss_curves.png``.

Exits non-zero if a run fails, SFT does not lower the evaluation loss, DPO does not raise the reward margin,
or a reloaded model's logits differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BOFT = {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "boft_target_modules": ["all-linear"], "boft_dropout": 0.0}
COMMON = {
    "bf16": False,  # CPU demo; TRL's default is bf16: true
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "max_length": 64,
    "logging_steps": 5,
    "eval_strategy": "steps",
    "eval_on_start": True,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 5,
    "seed": 0,
    "probe_text": "<|user|>reverse abcdef</s><|assistant|>",
    "export_merged": True,
}


def _write_yaml(path: Path, recipe: dict) -> Path:
    import yaml

    header = f"# Written by boft_plugin.main_job; run alone with: boft-plugin {path.stem} --config {path.name}\n"
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepare_workdir(workdir: Path, base_steps: int, sft_steps: int, dpo_steps: int) -> dict[str, Path]:
    """Base model, data and the two recipes, written to ``workdir``."""
    from .synthetic_tasks import make_toy_base, preference_examples, sft_examples, write_jsonl

    data = workdir / "data"
    paths = {
        "base": make_toy_base(workdir / "base", seed=0, steps=base_steps),
        "sft_train": write_jsonl(sft_examples(512, seed=0), data / "sft_train.jsonl"),
        "sft_eval": write_jsonl(sft_examples(32, seed=100), data / "sft_eval.jsonl"),
        "dpo_train": write_jsonl(preference_examples(256, seed=1), data / "dpo_train.jsonl"),
        "dpo_eval": write_jsonl(preference_examples(32, seed=101), data / "dpo_eval.jsonl"),
    }
    paths["sft_out"], paths["dpo_out"] = workdir / "sft", workdir / "dpo"
    sft = {
        "model_name_or_path": str(paths["base"]),
        "dataset_name": str(paths["sft_train"]),
        "eval_dataset_name": str(paths["sft_eval"]),
        "output_dir": str(paths["sft_out"]),
        **BOFT,
        "learning_rate": 2.0e-2,
        "max_steps": sft_steps,
        "eval_steps": max(1, sft_steps // 3),
        **COMMON,
    }
    dpo = {
        "init_adapter": str(paths["sft_out"]),
        "dataset_name": str(paths["dpo_train"]),
        "eval_dataset_name": str(paths["dpo_eval"]),
        "output_dir": str(paths["dpo_out"]),
        "learning_rate": 1.0e-2,
        "beta": 0.1,
        "max_steps": dpo_steps,
        "eval_steps": max(1, dpo_steps // 3),
        **COMMON,
    }
    paths["sft_recipe"] = _write_yaml(workdir / "sft.yaml", sft)
    paths["dpo_recipe"] = _write_yaml(workdir / "dpo.yaml", dpo)
    return paths


def launch(task: str, recipe: Path, nproc: int, timeout: float) -> None:
    """``torch.distributed.run`` with ``nproc`` gloo ranks running ``boft-plugin <task>``; output streamed."""
    from .launchers import cpu_env, run, torchrun_cmd

    cmd = torchrun_cmd(["boft_plugin", task, "--config", str(recipe)], nproc_per_node=nproc, module=True)
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = run(cmd, timeout=timeout, env=cpu_env(), echo=True)
    if result.returncode != 0:
        reason = "timed out" if result.timed_out else f"exited with {result.returncode}"
        raise RuntimeError(f"boft-plugin {task} {reason}")


def plot(sft: dict, dpo: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(summary, key):
        entries = [e for e in summary["log_history"] if key in e]
        return [e["step"] for e in entries], [e[key] for e in entries]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        axes[0].plot(*series(sft, key), marker="o", ms=3, label=label)
        axes[1].plot(*series(dpo, key), marker="o", ms=3, label=label)
    for key, label in (("rewards/margins", "train"), ("eval_rewards/margins", "eval")):
        axes[2].plot(*series(dpo, key), marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("SFT loss (BOFT, m=2)", "DPO loss", "DPO reward margin")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(sft: dict, dpo: dict, reports: list[dict], files: list[Path], wall: float, nproc: int) -> tuple:
    """(summary text, list of failed checks)."""
    sft_before, sft_after = sft["eval_first"], sft["eval_last"]
    dpo_before, dpo_after = dpo["eval_first"], dpo["eval_last"]
    failures = []
    if not sft_after["eval_loss"] < sft_before["eval_loss"]:
        failures.append("SFT did not lower the evaluation loss")
    if not dpo_after["eval_rewards/margins"] > dpo_before["eval_rewards/margins"]:
        failures.append("DPO did not raise the evaluation reward margin")
    for report in reports:
        if not report["ok"]:
            failures.append(f"reload of {report['output_dir']}: {'; '.join(report['problems'])}")
        if report.get("n_butterfly_factor") != BOFT["boft_n_butterfly_factor"]:
            failures.append(f"stock PEFT rebuilt {report['output_dir']} with m={report.get('n_butterfly_factor')}")
    lines = [
        f"BOFT main job: tiny Llama, {nproc} gloo ranks (torch.distributed.run), boft_block_size="
        f"{BOFT['boft_block_size']}, boft_n_butterfly_factor={BOFT['boft_n_butterfly_factor']}",
        f"SFT  train loss {_fmt(sft['first_train_loss'])} -> {_fmt(sft['last_train_loss'])}   eval loss "
        f"{_fmt(sft_before['eval_loss'])} -> {_fmt(sft_after['eval_loss'])}   eval token accuracy "
        f"{_fmt(sft_before.get('eval_mean_token_accuracy'), 3)} -> "
        f"{_fmt(sft_after.get('eval_mean_token_accuracy'), 3)}",
        f"DPO  train loss {_fmt(dpo['first_train_loss'])} -> {_fmt(dpo['last_train_loss'])}   eval reward margin "
        f"{_fmt(dpo_before['eval_rewards/margins'])} -> {_fmt(dpo_after['eval_rewards/margins'])}   eval reward "
        f"accuracy {_fmt(dpo_before['eval_rewards/accuracies'], 3)} -> {_fmt(dpo_after['eval_rewards/accuracies'], 3)}",
        "Reload in a fresh process (stock PEFT BOFT, m=2 / plain transformers), max relative logit error:",
    ]
    for report, name in zip(reports, ("SFT", "DPO")):
        lines.append(
            f"  {name}: adapter {report['oracle_rel_err']:.2e} ({report['stock_layer']}, "
            f"m={report['n_butterfly_factor']}), merged {report.get('merged_rel_err', float('nan')):.2e}"
        )
    lines.append("Files:")
    lines += [f"  {path}" for path in files]
    lines.append(f"Wall time: {wall:.0f} s   Checks: {'all passed' if not failures else 'FAILED'}")
    lines += [f"  FAILED: {failure}" for failure in failures]
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="boft-plugin demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="outputs/main_job", help="where everything is written")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks per run")
    parser.add_argument("--base-steps", type=int, default=300, help="full training steps of the toy base model")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launched run")
    args = parser.parse_args(argv)

    started = time.time()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"boft-plugin main job in {workdir}", flush=True)
    try:
        paths = prepare_workdir(workdir, args.base_steps, args.sft_steps, args.dpo_steps)
        print(f"toy base model (copy task, {args.base_steps} full steps) -> {paths['base']}", flush=True)
        launch("sft", paths["sft_recipe"], args.nproc, args.timeout)
        launch("dpo", paths["dpo_recipe"], args.nproc, args.timeout)
        from .recipes.outputs import SUMMARY_FILE
        from .recipes.verify import verify_in_fresh_process

        print("\nreloading the exports in a fresh process with stock PEFT / transformers ...", flush=True)
        reports = verify_in_fresh_process(paths["sft_out"], paths["dpo_out"], timeout=args.timeout)
        sft = json.loads((paths["sft_out"] / SUMMARY_FILE).read_text())
        dpo = json.loads((paths["dpo_out"] / SUMMARY_FILE).read_text())
        png = plot(sft, dpo, workdir / "loss_curves.png")
    except Exception as err:  # noqa: BLE001 - the job reports any failure as a non-zero exit
        print(f"\nmain job FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    files = [
        paths["sft_recipe"],
        paths["dpo_recipe"],
        paths["sft_out"] / "adapter_model.safetensors",
        paths["sft_out"] / "merged",
        paths["dpo_out"] / "adapter_model.safetensors",
        paths["dpo_out"] / "merged",
        png,
    ]
    text, failures = summarize(sft, dpo, reports, files, time.time() - started, args.nproc)
    (workdir / "summary.txt").write_text(text + "\n")
    (workdir / "summary.json").write_text(json.dumps({"reports": reports, "failures": failures}, indent=2))
    print("\n" + "=" * 100 + "\n" + text + "\n" + "=" * 100, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
