"""BOFT adapters as LoRA adapters (boft-plugin convert --to-lora, boft_plugin.export_lora): exact at full rank,
error falling with rank and read off the spectrum, budgets met or refused, what stock PEFT and vLLM's rules accept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import boft_plugin
from boft_plugin.export import convert_to_lora, export_lora
from boft_plugin.export.lora import adapter_delta
from boft_plugin.export.lora_report import SERVER_RANKS
from boft_plugin.ops.low_rank import choose_rank, lora_factors, spectrum_of
from boft_plugin.ops.reference import low_rank_error_reference
from boft_plugin.testing.paths import REPO
from boft_plugin.testing.quantised import save_tiny_llama
from boft_plugin.toy.models import char_tokenizer

WORKER = REPO / "tests" / "workers" / "load_lora.py"
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _randomise(model, scale: float = 0.1) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "boft_R" in name:
                param.normal_(0.0, scale)
            elif "boft_s" in name:
                param.uniform_(0.9, 1.1)


@pytest.fixture(scope="module")
def boft_run(tmp_path_factory):
    """A tiny Llama checkpoint and a trained-looking m = 2 BOFT adapter on it, with the BOFT model's probe logits."""
    from peft import BOFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_llama(root / "base")
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(base)
    boft_plugin.register()
    try:
        config = BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS, init_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).eval()
        _randomise(model)
        model.save_pretrained(root / "boft")
        tokenizer.save_pretrained(root / "boft")
        ids = tokenizer("BOFT as LoRA: how much is lost?", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        boft_plugin.unregister()
    torch.save(ids, root / "ids.pt")
    return {"root": root, "base": base, "boft": root / "boft", "ids": ids, "logits": logits}


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "boft_plugin", "convert", *argv], capture_output=True, text=True, timeout=300
    )


def _stock_peft_logits(run: dict, lora_dir: Path) -> tuple[torch.Tensor, dict]:
    out = lora_dir.parent / f"{lora_dir.name}_logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(run["base"]), str(lora_dir), str(run["root"] / "ids.pt"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True), json.loads(proc.stdout.strip().splitlines()[-1])


def _rel(actual, expected) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def test_full_rank_through_the_cli_is_exact_and_loads_in_stock_peft(boft_run):
    target = boft_run["root"] / "lora_full"
    proc = _cli("--to-lora", str(boft_run["boft"]), str(target), "--rank", "64")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["max_relative_error"] < 1e-12 and printed["budget_met"]
    assert printed["probe"]["logit_rel_err"] < 1e-5 and printed["probe"]["kl_max"] < 1e-9
    assert printed["probe"]["adapter_kl_mean"] > 1e-4  # the adapter does move the model: the check is not vacuous
    logits, loaded = _stock_peft_logits(boft_run, target)
    assert not loaded["boft_plugin_imported"] and loaded["layer"].startswith("peft.tuners.lora")
    assert loaded["layers"] == 2 * len(TARGETS) and loaded["scalings"] == [1.0]
    assert _rel(logits, boft_run["logits"]) < 1e-5
    report = json.loads((target / "lora_conversion.json").read_text())
    assert len(report["layers"]) == 2 * len(TARGETS) and report["probe"] == printed["probe"]
    assert (target / "tokenizer_config.json").is_file()  # the tokenizer travels, the run's other files do not


def test_config_carries_nothing_a_lora_only_server_refuses(boft_run):
    target = boft_run["root"] / "lora_budget"
    report = convert_to_lora(boft_run["boft"], target, max_error=0.2, probe=False)
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] is None
    assert config["use_dora"] is False and config["bias"] == "none" and config["use_rslora"] is False
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert len(set(ranks.values())) > 1  # the budget chose different ranks per layer
    assert config["r"] == max(ranks.values()) == config["lora_alpha"]  # vLLM's one scaling alpha / r is 1 ...
    assert config["rank_pattern"] == config["alpha_pattern"]  # ... and so is PEFT's per layer
    assert set(config["rank_pattern"]) == {n for n, r in ranks.items() if r != config["r"]}
    from safetensors import safe_open

    with safe_open(target / "adapter_model.safetensors", framework="pt") as handle:
        for name, rank in ranks.items():
            assert handle.get_slice(f"base_model.model.{name}.lora_A.weight").get_shape()[0] == rank
            assert handle.get_slice(f"base_model.model.{name}.lora_B.weight").get_shape()[1] == rank
    logits, loaded = _stock_peft_logits(boft_run, target)
    assert loaded["scalings"] == [1.0] and loaded["ranks"] == sorted(set(ranks.values()))


def test_error_falls_with_rank_and_budget_picks_the_smallest_rank(boft_run):
    from safetensors.torch import load_file

    weights = load_file(boft_run["base"] / "model.safetensors")
    adapter = load_file(boft_run["boft"] / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    delta = adapter_delta(
        weights[f"{name}.weight"],
        [(adapter[f"base_model.model.{name}.boft_R"], adapter[f"base_model.model.{name}.boft_s"])],
    )
    spectrum = spectrum_of(delta)
    errors = [spectrum.relative_error(r) for r in range(spectrum.full_rank + 1)]
    assert errors[0] == pytest.approx(1.0) and errors[-1] < 1e-12
    assert all(a >= b for a, b in zip(errors, errors[1:]))  # monotone
    for rank in (1, 7, 33, 64):  # the spectrum's figure is the real error of the factors written (slow twin)
        a, b = lora_factors(spectrum, rank)
        assert low_rank_error_reference(delta, a, b) == pytest.approx(errors[rank], abs=1e-9)
    choice = choose_rank(spectrum, max_error=0.3)
    assert errors[choice.rank] <= 0.3 < errors[choice.rank - 1] and choice.budget_met
    snapped = choose_rank(spectrum, max_error=0.3, allowed=SERVER_RANKS["vllm"])
    assert snapped.rank in SERVER_RANKS["vllm"] and snapped.rank >= choice.rank
    assert choose_rank(spectrum, rank=128).rank == spectrum.full_rank == 64  # never above full rank: exact there
    assert choose_rank(spectrum, max_error=1e-3, allowed=SERVER_RANKS["vllm"]).rank == 64  # 128 would add zeros
    a, b = lora_factors(spectrum, 80)  # factors above full rank are zero-padded (still exact)
    assert a.shape == (80, 128) and b.shape == (64, 80) and low_rank_error_reference(delta, a, b) < 1e-12
    reports = [convert_to_lora(boft_run["boft"], boft_run["root"] / f"r{r}", rank=r, probe=False) for r in (2, 8, 32)]
    per_rank = [max(layer.relative_error for layer in report.layers) for report in reports]
    assert per_rank[0] > per_rank[1] > per_rank[2]


def test_budget_no_allowed_rank_meets_exits_1_and_writes_nothing(boft_run):
    target = boft_run["root"] / "never"
    proc = _cli(
        "--to-lora", str(boft_run["boft"]), str(target), "--max-error", "1e-3", "--ranks", "vllm", "--max-rank", "8"
    )
    assert proc.returncode == 1, proc.stderr
    assert "no allowed rank (<= 8) meets max_error=0.001" in proc.stderr
    assert "model.layers.0.self_attn.q_proj" in proc.stderr and "nothing was written" in proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["budget_met"] is False and len(printed["over_budget"]) == 2 * len(TARGETS)
    assert not target.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rank", "10", "--ranks", "vllm"], "rank 10 is not one of vllm's ranks"),
        (["--rank", "8", "--max-error", "0.1"], "give exactly one of rank"),
        (["--max-error", "1.5"], "max_error is a relative error in [0, 1)"),
        (["--rank", "0"], "rank must be a positive integer"),
        (["--rank", "8", "--base_model", "/nonexistent/base"], "is not a local directory"),
        (["--rank", "8", "--prompt-file", "/nonexistent/prompt.txt"], "no such prompt file"),
    ],
)
def test_bad_options_refused_before_any_work(boft_run, argv, message, capsys):
    from boft_plugin.cli import main

    target = boft_run["root"] / "refused"
    code = main(["convert", "--to-lora", str(boft_run["boft"]), str(target), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not target.exists()


def test_existing_target_and_foreign_adapters_refused_nothing_lost(boft_run, tmp_path, capsys):
    from boft_plugin.cli import main

    target = tmp_path / "users_dir"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert main(["convert", "--to-lora", str(boft_run["boft"]), str(target), "--rank", "4"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    # a BOFT adapter that trains whole modules cannot be served as LoRA: refused with the alternative
    foreign = tmp_path / "with_modules"
    foreign.mkdir()
    config = json.loads((boft_run["boft"] / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    (foreign / "adapter_model.safetensors").write_bytes((boft_run["boft"] / "adapter_model.safetensors").read_bytes())
    assert main(["convert", "--to-lora", str(foreign), str(tmp_path / "out"), "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "modules_to_save" in err and "merged model" in err and not (tmp_path / "out").exists()
    # converting again into an earlier conversion replaces it whole
    first = convert_to_lora(boft_run["boft"], tmp_path / "again", rank=2, probe=False)
    second = convert_to_lora(boft_run["boft"], tmp_path / "again", rank=4, probe=False)
    assert {layer.rank for layer in first.layers} == {2} and {layer.rank for layer in second.layers} == {4}
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["r"] == 4


def test_export_lora_from_a_live_model_equals_the_file_conversion(boft_run, registered):
    """The collective driver (here one process) writes the same LoRA as the file driver; Conv1D (fan_in_fan_out)
    and Conv2d layers convert exactly at full rank."""
    from peft import BOFTConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from boft_plugin.export.loading import load_adapter

    live = load_adapter(AutoModelForCausalLM.from_pretrained(boft_run["base"]), boft_run["boft"])
    report = export_lora(live, boft_run["root"] / "live", rank=16)
    files = convert_to_lora(boft_run["boft"], boft_run["root"] / "files", rank=16, probe=False)
    assert sorted((x.name, x.rank) for x in report.layers) == sorted((x.name, x.rank) for x in files.layers)
    a, b = (
        load_file(boft_run["root"] / "live" / "adapter_model.safetensors"),
        load_file(boft_run["root"] / "files" / "adapter_model.safetensors"),
    )
    for key in (k for k in a if k.endswith("lora_A.weight")):
        key_b = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(a[key_b] @ a[key], b[key_b] @ b[key], atol=1e-6, rtol=1e-5)

    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from transformers.pytorch_utils import Conv1D

            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.proj = Conv1D(32, 16)  # GPT-2 layout: 16 in, 32 out, weight (in, out)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))  # (n, 8)
            return self.proj(torch.cat([y, y], -1))

    for module, width in (("conv", 36), ("proj", 16)):
        config = BOFTConfig(
            boft_block_size=4, target_modules=[module], init_weights=False, fan_in_fan_out=module == "proj"
        )
        model = get_peft_model(ConvNet(), config).eval()
        _randomise(model, 0.3)
        x = torch.randn(3, 4, 5, 5)
        with torch.no_grad():
            expected = model(x)
        out = boft_run["root"] / f"lora_{module}"
        conv_report = export_lora(model, out, rank=width)
        assert conv_report.layers[0].relative_error < 1e-12
        boft_plugin.unregister()
        lora = PeftModel.from_pretrained(ConvNet(), str(out)).eval()
        with torch.no_grad():
            assert _rel(lora(x), expected) < 1e-5
        boft_plugin.register()
