"""What a new user gets wrong with a recipe of their own: every mistake fails early, in one line, and nothing they
had is lost (docs/refused_inputs.md lists every refused input)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

from boft_plugin.cli import main as cli_main
from boft_plugin.recipes import parse_recipe
from boft_plugin.runtime.launchers import cpu_env, launch
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def data(tmp_path):
    return write_tiny_data(tmp_path / "data")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its content hash."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def one_line_error(capsys, code: int) -> str:
    """The error the command printed: exit code 2, no traceback, one line (progress bars before it aside)."""
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("boft-plugin ") and " error: " in lines[-1], err
    assert sum(" error: " in line for line in lines) == 1, err
    return lines[-1]


def test_output_dir_with_another_adapter_is_refused_untouched(tmp_path, data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    foreign = {"peft_type": "LORA", "base_model_name_or_path": "someone/else", "r": 8}
    (out / "adapter_config.json").write_text(json.dumps(foreign))
    (out / "adapter_model.safetensors").write_bytes(b"lora weights")
    (out / "README.md").write_text("my LoRA adapter")
    before = snapshot(out)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", out, data, max_steps=1, eval_strategy="no"))
    err = one_line_error(capsys, cli_main(["sft", "--config", recipe]))
    assert str(out) in err and "LORA adapter" in err and "overwrite_output_dir" in err
    assert snapshot(out) == before  # nothing written, nothing replaced

    # the same directory with another BOFT geometry is refused too
    (out / "adapter_config.json").write_text(json.dumps({**foreign, "peft_type": "BOFT"}))
    err = one_line_error(capsys, cli_main(["sft", "--config", recipe]))
    assert "base model 'someone/else'" in err


def test_a_runs_own_output_dir_is_reused_and_overwrite_replaces_a_foreign_one(tmp_path, data):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe("sft", out, data, max_steps=1, eval_strategy="no", eval_on_start=False, probe_text=None),
    )
    assert cli_main(["sft", "--config", recipe]) == 0
    assert cli_main(["sft", "--config", recipe]) == 0  # the run's own files: re-export works
    config = json.loads((out / "adapter_config.json").read_text())
    config["boft_block_size"] = 8
    (out / "adapter_config.json").write_text(json.dumps(config))
    assert cli_main(["sft", "--config", recipe]) == 2  # another geometry: refused
    assert cli_main(["sft", "--config", recipe, "--overwrite_output_dir", "true"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["boft_block_size"] == 4


def test_adapter_trained_with_relative_paths_loads_from_anywhere(tmp_path, data):
    work = tmp_path / "work"
    work.mkdir()
    mapping = tiny_recipe("sft", "runs/x", data, max_steps=1, eval_strategy="no", eval_on_start=False)
    recipe = write_recipe(work / "r.yaml", mapping)
    launch(
        [sys.executable, "-m", "boft_plugin", "sft", "--config", "r.yaml"], timeout=300, env=cpu_env(), cwd=str(work)
    ).check("sft with a relative output_dir")
    adapter = work / "runs" / "x"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and Path(base) == adapter / "base_model"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    load = (
        "import sys, boft_plugin; from peft import AutoPeftModelForCausalLM; boft_plugin.register(); "
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); print('loaded', type(m).__name__)"
    )
    result = launch([sys.executable, "-c", load, str(adapter)], timeout=300, env=cpu_env(), cwd=str(elsewhere))
    assert "loaded PeftModelForCausalLM" in result.check("load from another directory").output
    verify = launch(
        [sys.executable, "-m", "boft_plugin", "verify", str(adapter)], timeout=300, env=cpu_env(), cwd=str(elsewhere)
    )
    assert verify.check("verify from another directory").returncode == 0
    del recipe


def test_verify_without_probe_or_base_says_so_in_one_line(tmp_path, data):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe("sft", out, data, max_steps=1, eval_strategy="no", eval_on_start=False, probe_text=None),
    )
    assert cli_main(["sft", "--config", recipe]) == 0
    assert not (out / "probe_logits.pt").exists()
    report = launch([sys.executable, "-m", "boft_plugin", "verify", str(out), "--json"], timeout=300, env=cpu_env())
    line = json.loads(report.check("verify without a probe").output.strip().splitlines()[-1])
    assert line["ok"] and line["expected"].startswith("boft-plugin") and line["oracle_rel_err"] < 1e-5

    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved_away")
    (out / "adapter_config.json").write_text(json.dumps(config))
    missing = launch([sys.executable, "-m", "boft_plugin", "verify", str(out)], timeout=300, env=cpu_env())
    assert missing.returncode == 2 and "Traceback" not in missing.output
    assert "moved_away" in missing.output and "--base_model" in missing.output


def test_malformed_jsonl_names_the_file_and_line_before_anything_is_written(tmp_path, data, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(5)]
    rows[3] = rows[3][:-1]  # one missing "}"
    bad.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", out, data, dataset_name=str(bad)))
    err = one_line_error(capsys, cli_main(["sft", "--config", recipe]))
    assert f"{bad} line 4" in err and "'dataset_name'" in err
    assert not out.exists()


def test_uninstalled_report_to_is_refused_before_anything_is_written(tmp_path, data, capsys):
    from transformers.integrations import get_available_reporting_integrations

    missing = next(n for n in ("tensorboard", "wandb", "mlflow") if n not in get_available_reporting_integrations())
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", out, data, report_to=missing))
    err = one_line_error(capsys, cli_main(["sft", "--config", recipe]))
    assert f"'report_to': {missing} is not installed" in err
    assert not out.exists()


def test_unreachable_hub_dataset_fails_after_one_try(tmp_path, data, monkeypatch, capsys):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "out", data, dataset_name="someone/data"))
    started = time.monotonic()
    err = one_line_error(capsys, cli_main(["sft", "--config", recipe]))
    assert time.monotonic() - started < 10
    assert "'someone/data'" in err and "unreachable" in err


def test_help_shows_config_first_and_hides_refused_flags(capsys):
    assert cli_main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    options = [line.split()[0] for line in out.splitlines() if line.strip().startswith("--")]
    assert options[0] == "--config"
    for refused in ("--use_peft", "--lora_r", "--lora_alpha"):
        assert refused not in out
    assert "--load_in_4bit" in out and "--bnb_4bit_quant_storage" in out  # quantised bases are recipes too


def test_examples_parse_without_deprecation_warnings():
    for task in ("sft", "dpo", "kto", "grpo"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            example = str(REPO / "examples" / f"{task}_recipe.yaml")
            recipe = parse_recipe(task, ["--config", example, "--init_adapter", ""])
        assert recipe.training.activation_checkpointing is False


def test_trl_default_checkpointing_kept_under_its_current_name():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = parse_recipe("sft", ["--output_dir", "x", "--dataset_name", "d.jsonl"])
        flag = parse_recipe(
            "sft", ["--output_dir", "x", "--dataset_name", "d.jsonl", "--gradient_checkpointing", "false"]
        )
    assert default.training.activation_checkpointing is True  # TRL's default, kept
    assert flag.training.activation_checkpointing is False


def test_summary_names_evaluations_by_step(tmp_path, data):
    out = tmp_path / "out"
    mapping = tiny_recipe("sft", out, data, max_steps=4, eval_steps=2, eval_on_start=False, probe_text=None)
    assert cli_main(["sft", "--config", write_recipe(tmp_path / "r.yaml", mapping)]) == 0
    summary = json.loads((out / "boft_run_summary.json").read_text())
    assert "eval_before" not in summary and "eval_after" not in summary
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert summary["eval_first"]["step"] == 2 and summary["eval_last"]["step"] == 4
