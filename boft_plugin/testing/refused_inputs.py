"""Every refused input, tried for real: the table of docs/refused_inputs.md.

    python -m boft_plugin.testing.refused_inputs > docs/refused_inputs.md

Each case feeds one mistake to the command line (exit code and the one line it prints) or to the Python API (the
exception), and checks that what the user had is untouched. ``tests/recipes/test_refused_inputs.py`` regenerates
the table and compares it with the file, so the documented messages are the real ones.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .recipes import tiny_recipe, write_tiny_data


@dataclass
class Outcome:
    exit: str  # "2" (CLI) or the exception class
    message: str
    untouched: str


def _snapshot(directory: Path) -> dict[str, str]:
    if not directory.exists():
        return {}
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli(argv: list[str], env: dict | None = None) -> tuple[int, str]:
    from ..cli import main

    saved = dict(os.environ)
    os.environ.update(env or {})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lines = err.getvalue().splitlines()
    first = next((i for i, line in enumerate(lines) if " error: " in line), None)
    if first is None:
        return code, err.getvalue().strip()
    return code, lines[first] + (" ..." if first + 1 < len(lines) else "")


class _Cases:
    """The cases, each a method returning an :class:`Outcome`; ``work`` is a scratch directory."""

    def __init__(self, work: Path):
        self.work = work
        self.data = write_tiny_data(work / "data")

    def _recipe(self, name: str, task: str = "sft", **overrides) -> tuple[str, Path]:
        import yaml

        out = self.work / name / "out"
        mapping = tiny_recipe(task, out, self.data, **overrides)
        path = self.work / name / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(mapping))
        return str(path), out

    def _refused_recipe(self, name: str, task: str = "sft", env: dict | None = None, **overrides) -> Outcome:
        path, out = self._recipe(name, task, **overrides)
        before = _snapshot(out)
        code, message = _cli([task, "--config", path], env)
        assert code == 2, (name, code, message)
        assert _snapshot(out) == before, name
        untouched = "output_dir not created" if not before else "output_dir files unchanged"
        return Outcome(str(code), message, f"{untouched}; nothing loaded")

    # -- recipes (boft-plugin sft / dpo / kto) ------------------------------------------------------------------------
    def recipe_case(self, name: str, overrides: dict) -> Outcome:
        return self._refused_recipe(name, **overrides)

    def missing_data_file(self):
        return self._refused_recipe("missing", dataset_name=str(self.work / "nope" / "train.jsonl"))

    def malformed_jsonl(self):
        bad = self.work / "bad.jsonl"
        rows = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(5)]
        rows[3] = rows[3][:-1]
        bad.write_text("\n".join(rows) + "\n")
        return self._refused_recipe("malformed", dataset_name=str(bad))

    def wrong_columns(self):
        return self._refused_recipe("columns", task="dpo", dataset_name=str(self.data["sft"]), boft_block_size=4)

    def kto_string_labels(self):
        bad = self.work / "kto_labels.jsonl"
        rows = [{"prompt": "reverse ab=", "completion": "ba", "label": "good"}] * 8
        bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return self._refused_recipe("kto_labels", task="kto", dataset_name=str(bad), tiny_model=True)

    def kto_random_sampling(self):
        return self._refused_recipe("kto_random", task="kto", tiny_model=True, train_sampling_strategy="random")

    def grpo_reward_needs_a_column(self):
        return self._refused_recipe(
            "grpo_reward", task="grpo", tiny_model=True, boft_block_size=4, reward_funcs=["accuracy_reward"]
        )

    def grpo_reward_not_importable(self):
        return self._refused_recipe(
            "grpo_import", task="grpo", tiny_model=True, boft_block_size=4, reward_funcs=["no_such_reward_module.score"]
        )

    def foreign_output_dir(self):
        _, out = self._recipe("foreign")
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x/y"}))
        (out / "adapter_model.safetensors").write_bytes(b"LoRA weights")
        return self._refused_recipe("foreign")

    def report_to_missing(self):
        from transformers.integrations import get_available_reporting_integrations

        missing = next(n for n in ("tensorboard", "wandb", "mlflow") if n not in get_available_reporting_integrations())
        return self._refused_recipe("report", report_to=missing)

    def hub_unreachable(self):
        import huggingface_hub.constants as hub

        endpoint, hub.ENDPOINT = hub.ENDPOINT, "http://127.0.0.1:9"  # nothing listens there
        try:
            env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}
            return self._refused_recipe("hub", env=env, dataset_name="someone/data")
        finally:
            hub.ENDPOINT = endpoint

    def too_few_rows(self):
        return self._refused_recipe("few", per_device_train_batch_size=128)

    def group_by_length(self):
        return self._refused_recipe("group", train_sampling_strategy="group_by_length")

    def init_adapter_missing(self):
        return self._refused_recipe("init", task="dpo", init_adapter=str(self.work))

    def deepspeed_bf16_mode_on_cpu(self):
        if torch.cuda.is_available():
            return Outcome("2", "(not refused on a machine with GPUs)", "-")
        config = self.work / "ds_bf16_mode.json"  # DeepSpeed's own bf16 mode, asked for by the config itself
        config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
        env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
        return self._refused_recipe("dsbf16", env=env, bf16=True)

    def incomplete_checkpoint(self):
        path, out = self._recipe("resume")
        (out / "checkpoint-4").mkdir(parents=True)
        return self._refused_recipe("resume", resume_from_checkpoint=str(out / "checkpoint-4"))

    def _stock_checkpoint(self, out: Path, step: int, deepspeed: bool = False) -> None:
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
        (checkpoint / "scheduler.pt").write_bytes(b"scheduler")
        if deepspeed:
            (checkpoint / "latest").write_text(f"global_step{step}")
            (checkpoint / f"global_step{step}").mkdir()
        else:
            (checkpoint / "optimizer.pt").write_bytes(b"optimizer")

    def fresh_run_over_checkpoints(self):
        _, out = self._recipe("fresh")
        self._stock_checkpoint(out, 2)
        return self._refused_recipe("fresh")

    def untrusted_pickled_checkpoint(self):
        _, out = self._recipe("untrusted")
        self._stock_checkpoint(out, 4, deepspeed=True)
        return self._refused_recipe("untrusted", resume_from_checkpoint="auto")

    def output_dir_in_use(self):
        from ..runtime.run_lock import RunLock

        _, out = self._recipe("locked")
        with RunLock(out):
            return self._refused_recipe("locked")

    # -- the Python API --------------------------------------------------------------------------------------------
    @staticmethod
    def _api(fn: Callable[[], object], untouched: str) -> Outcome:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the refusal is the result
            return Outcome(
                type(err).__name__, str(err).splitlines()[0] + (" ..." if "\n" in str(err) else ""), untouched
            )
        raise AssertionError("not refused")

    @staticmethod
    def _adapted(base, **config):
        from peft import BOFTConfig, get_peft_model

        from ..tuner.registry import register, unregister

        register()
        try:
            return get_peft_model(base, BOFTConfig(**config))
        finally:
            unregister()

    def bad_geometry(self):
        base = torch.nn.Sequential(torch.nn.Linear(64, 8))
        return self._api(
            lambda: self._adapted(base, target_modules=["0"], boft_block_size=6, boft_n_butterfly_factor=2),
            "model not modified",
        )

    def non_square_conv(self):
        base = torch.nn.Sequential(torch.nn.Conv2d(8, 6, (1, 3)))
        return self._api(lambda: self._adapted(base, target_modules=["0"], boft_block_size=4), "model not modified")

    def quantised_layer(self):
        class Linear4bit(torch.nn.Linear):
            pass

        Linear4bit.__module__ = "bitsandbytes.nn.modules"
        base = torch.nn.Sequential(Linear4bit(64, 8))
        return self._api(lambda: self._adapted(base, target_modules=["0"], boft_block_size=4), "model not modified")

    def _saved_adapter(self, name: str) -> tuple[Path, torch.nn.Module]:
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(64, 8))
        model = self._adapted(copy.deepcopy(base), target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2)
        model.save_pretrained(self.work / name)
        return self.work / name, base

    def _load(self, path: Path, base, **kwargs) -> Outcome:
        from ..export.loading import load_adapter

        before = _snapshot(path)
        outcome = self._api(lambda: load_adapter(base, path, **kwargs), "model and files unchanged")
        assert _snapshot(path) == before
        return outcome

    def truncated_adapter(self):
        path, base = self._saved_adapter("truncated")
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        return self._load(path, base)

    def pickle_adapter(self):
        path, base = self._saved_adapter("pickle")
        from safetensors.torch import load_file

        torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
        (path / "adapter_model.safetensors").unlink()
        return self._load(path, base)

    def nan_adapter(self):
        path, base = self._saved_adapter("nan")
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "adapter_model.safetensors")
        next(t for k, t in tensors.items() if k.endswith("boft_R"))[0, 0, 0, 1] = float("nan")
        save_file(tensors, path / "adapter_model.safetensors")
        return self._load(path, base)

    def stock_factor_mismatch(self):
        path, base = self._saved_adapter("factors")
        from safetensors.torch import load_file, save_file

        tensors = {
            k: (t[:1].contiguous() if k.endswith("boft_R") else t)
            for k, t in load_file(path / "adapter_model.safetensors").items()
        }
        save_file(tensors, path / "adapter_model.safetensors")
        return self._load(path, base)

    def nan_scale_in_training(self):
        model = self._adapted(torch.nn.Sequential(torch.nn.Linear(32, 16)), target_modules=["0"], boft_block_size=4)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(torch.randn(2, 32)).sum().backward()
        model.base_model.model[0].boft_s["default"].grad[3] = float("nan")  # the step diverges
        return self._api(optimizer.step, "the error is raised by the step that produced the NaN")

    def unmerge_zero_scale(self):
        model = self._adapted(torch.nn.Sequential(torch.nn.Linear(32, 16)), target_modules=["0"], boft_block_size=4)
        with torch.no_grad():
            model.base_model.model[0].boft_s["default"][2] = 0.0
        model.merge_adapter()
        return self._api(model.unmerge_adapter, "layer stays merged, no NaN written")

    def convert_half_turn(self):
        path, _ = self._saved_adapter("halfturn")
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "adapter_model.safetensors")
        boft_r = next(t for k, t in tensors.items() if k.endswith("boft_R"))
        boft_r.zero_()
        boft_r[:, 0, 0, 1], boft_r[:, 0, 1, 0] = 1.0, -1.0  # two quarter turns of one plane: a half turn
        save_file(tensors, path / "adapter_model.safetensors")
        code, message = _cli(["convert", "--single-factor", str(path), str(self.work / "halfturn_single")])
        assert code == 2 and not (self.work / "halfturn_single").exists()
        return Outcome(str(code), message, "target not created")

    def convert_symlink(self):
        path, _ = self._saved_adapter("linked_source")
        linked = self.work / "linked"
        linked.mkdir()
        (linked / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
        (linked / "adapter_model.safetensors").symlink_to(path / "adapter_model.safetensors")
        code, message = _cli(["convert", "--single-factor", str(linked), str(self.work / "linked_single")])
        assert code == 2 and not (self.work / "linked_single").exists()
        return Outcome(str(code), message, "target not created")

    def convert_lora_rank_not_served(self):
        path, _ = self._saved_adapter("lora_rank")
        target = self.work / "lora_rank_out"
        code, message = _cli(["convert", "--to-lora", str(path), str(target), "--rank", "12", "--ranks", "vllm"])
        assert code == 2 and not target.exists()
        return Outcome(str(code), message, "target not created; nothing read")

    def convert_lora_budget_unmet(self):
        from peft import BOFTConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from ..tuner.registry import register, unregister
        from .quantised import save_tiny_llama

        base = save_tiny_llama(self.work / "lora_base")
        register()
        try:
            config = BOFTConfig(boft_block_size=8, target_modules=["q_proj"], init_weights=False)
            get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(self.work / "budget")
        finally:
            unregister()
        target = self.work / "budget_lora"
        argv = ["--max-error", "0.01", "--ranks", "vllm", "--max-rank", "8", "--no-probe"]
        code, message = _cli(["convert", "--to-lora", str(self.work / "budget"), str(target), *argv])
        assert code == 1 and not target.exists()
        return Outcome(str(code), message, "target not created (the report is printed)")

    def verify_missing_base(self):
        path, _ = self._saved_adapter("nobase")
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(self.work / "moved_away")
        (path / "adapter_config.json").write_text(json.dumps(config))
        code, message = _cli(["verify", str(path)])
        assert code == 2
        return Outcome(str(code), message, "nothing written")


RECIPE_CASES = {  # label: recipe overrides that a run refuses
    "unknown recipe key": {"warmup_stepz": 3},
    "odd boft_block_size with boft_n_butterfly_factor 2": {"boft_block_size": 3},
    "boft_block_size that does not divide a layer width": {"boft_block_size": 48},
    "both boft_block_size and boft_block_num": {"boft_block_num": 8},
    "a LoRA key": {"lora_r": 8},
    "a 4-bit key without load_in_4bit": {"bnb_4bit_quant_type": "fp4"},
    "a quantised base under FSDP2": {"load_in_4bit": True, "fsdp2_pre_shard": True},
    "boft_dropout outside [0, 1)": {"boft_dropout": 1.5},
    "boft_target_modules selecting the output layer": {"boft_target_modules": ["lm_head"]},
    "boft_target_modules matching nothing": {"boft_target_modules": ["no_such_layer"]},
    "export_lora_ranks without a rank or budget": {"export_lora_ranks": "vllm"},
}
CASES = {
    "missing dataset file": "missing_data_file",
    "malformed JSONL line": "malformed_jsonl",
    "SFT data given to DPO": "wrong_columns",
    "KTO labels that are not booleans": "kto_string_labels",
    "KTO with random sampling (its KL term needs the sequential order)": "kto_random_sampling",
    "a GRPO reward that needs a column the data lacks": "grpo_reward_needs_a_column",
    "a GRPO reward whose module cannot be imported": "grpo_reward_not_importable",
    "output_dir holding another run's adapter": "foreign_output_dir",
    "report_to an integration that is not installed": "report_to_missing",
    "hub dataset, hub unreachable": "hub_unreachable",
    "fewer rows than one global batch": "too_few_rows",
    "train_sampling_strategy: group_by_length": "group_by_length",
    "init_adapter without an adapter": "init_adapter_missing",
    "DeepSpeed's own bf16 mode (its config enables it) on a machine without GPUs": "deepspeed_bf16_mode_on_cpu",
    "resume_from_checkpoint naming an incomplete checkpoint": "incomplete_checkpoint",
    "a fresh run over existing checkpoint-N directories": "fresh_run_over_checkpoints",
    "resuming a DeepSpeed checkpoint not signed for this user": "untrusted_pickled_checkpoint",
    "output_dir locked by a run that is still running": "output_dir_in_use",
    "get_peft_model, block size that fits no width": "bad_geometry",
    "get_peft_model, non-square Conv2d kernel": "non_square_conv",
    "get_peft_model, quantised layer no PEFT backend handles": "quantised_layer",
    "load_adapter, truncated safetensors": "truncated_adapter",
    "load_adapter, pickle file (allow_pickle not set)": "pickle_adapter",
    "load_adapter, NaN in boft_R": "nan_adapter",
    "load_adapter, stock PEFT CPU file (config m=2, tensors m=1)": "stock_factor_mismatch",
    "optimizer step that leaves a NaN boft_s": "nan_scale_in_training",
    "unmerge with boft_s = 0": "unmerge_zero_scale",
    "convert --single-factor, a half turn": "convert_half_turn",
    "convert --single-factor, a symbolic link in the source": "convert_symlink",
    "convert --to-lora, a rank the server does not serve": "convert_lora_rank_not_served",
    "convert --to-lora, an error budget no allowed rank meets": "convert_lora_budget_unmet",
    "verify, base model moved away": "verify_missing_base",
}


def _normalise(text: str, work: Path) -> str:
    text = text.replace(str(work), "<tmp>")
    text = re.sub(r"/tmp/[^ '\"]*", "<tmp>", text)
    text = re.sub(
        r"pid \d+ on host \S+, started [\d: -]+\([^)]*\)", "pid <pid> on host <host>, started <time> (<command>)", text
    )
    return text.replace("|", "\\|")


def table() -> str:
    lines = [
        "| input | exit / exception | message | left untouched |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        cases = _Cases(work)
        for index, (label, overrides) in enumerate(RECIPE_CASES.items()):
            outcome = cases.recipe_case(f"recipe{index}", overrides)
            lines.append(f"| {label} | {outcome.exit} | {_normalise(outcome.message, work)} | {outcome.untouched} |")
        for label, method in CASES.items():
            outcome = getattr(cases, method)()
            lines.append(f"| {label} | {outcome.exit} | {_normalise(outcome.message, work)} | {outcome.untouched} |")
    return "\n".join(lines)


HEADER = """# Every refused input

What boft-plugin refuses, before anything is written or changed. Command-line cases print one line on stderr and exit
with code 2 (1 for a LoRA error budget that no allowed rank meets, found by the conversion's own work); Python API
cases raise the exception named. Generated by running every case for real:
`python -m boft_plugin.testing.refused_inputs > docs/refused_inputs.md` (`tests/recipes/test_refused_inputs.py`
checks that this file is what the cases print). `<tmp>` stands for the case's scratch directory.

"""


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    print(HEADER + table())
