"""Single-factor export: an m > 1 adapter written as the exactly equivalent m = 1 adapter (block size b * 2**(m-1)),
which stock PEFT as installed loads on a machine without its CUDA extension, with our m > 1 outputs."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import boft_plugin
from boft_plugin.export.single_factor import convert_to_single_factor
from boft_plugin.ops.single_factor import (
    SingleFactorError,
    composed_blocks,
    peft_cayley_float32,
    single_factor_blocks,
    skew_preimage,
)
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.testing.models import max_rel_err
from boft_plugin.testing.paths import WORKERS

CHILD = WORKERS
sys.path.insert(0, str(CHILD))
from stock_models import build  # noqa: E402  (tests/workers/stock_models.py: no boft_plugin import, shared with the child)

BLOCK = {"linear": 4, "conv": 2}  # linear widths 64/96 and conv width 144 split into b * 2**(m-1) blocks


def make_adapter(path: Path, kind: str, m: int, bias: str, scale: float, seed: int = 0) -> tuple:
    """Our tuner, train-like random boft_R / boft_s (and biases), saved; returns (input, our m > 1 output)."""
    base = build(kind)
    boft_plugin.register()
    try:
        config = BOFTConfig(
            target_modules=base.targets, boft_block_size=BLOCK[kind], boft_n_butterfly_factor=m, bias=bias
        )
        model = get_peft_model(copy.deepcopy(base), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("boft_R.default"):
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
                elif name.endswith("boft_s.default"):
                    param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
                elif name.endswith("bias") and param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        x = type(base).example()
        with torch.no_grad():
            expected = model.eval()(x)
        model.save_pretrained(path)
    finally:
        boft_plugin.unregister()
    return x, expected


def test_peft_m1_path_is_the_identity_permutation_and_our_cayley_convention():
    from peft.tuners.boft.layer import BOFTLayer

    assert torch.equal(BOFTLayer.block_butterfly_perm(None, 48, 6, 4, n_butterfly_factor=0), torch.arange(48))
    s = torch.randn(5, 8, 8)
    s = 0.5 * (s - s.transpose(-1, -2))
    eye = torch.eye(8)
    q = BOFTLayer.cayley_batch(None, s)
    assert torch.allclose(q, (eye - s) @ torch.linalg.inv(eye + s), atol=1e-6)
    assert torch.allclose(peft_cayley_float32(s), q)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_preimage_reproduces_the_composed_rotation(m):
    boft_r = torch.randn(m, 16, 4, 4, dtype=torch.float64) * 0.3
    s, check = single_factor_blocks(boft_r)
    q = composed_blocks(boft_r)
    be = 4 * 2 ** (m - 1)
    assert s.shape == (1, 16 // 2 ** (m - 1), be, be) and torch.equal(s, -s.transpose(-1, -2))
    eye = torch.eye(be, dtype=torch.float64)
    assert torch.allclose(2 * torch.linalg.inv(eye + s[0]) - eye, q, atol=1e-12)
    assert check.round_trip_f32 < 1e-6 and torch.allclose(skew_preimage(q), s[0], atol=1e-12)


def _half_turn_boft_r(angle_deg: float) -> torch.Tensor:
    """m=2, b=4, N=2: both factors rotate the plane (0, 1) by angle/2: the composition rotates it by angle."""
    a = math.tan(math.radians(angle_deg / 2) / 2)
    boft_r = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    for factor in (0, 1):
        boft_r[factor, 0, 0, 1], boft_r[factor, 0, 1, 0] = a, -a
    return boft_r


@pytest.mark.parametrize("angle", [180.0, 179.9, 177.5])
def test_refuses_a_rotation_near_a_half_turn_naming_the_block(angle):
    with pytest.raises(SingleFactorError, match=r"layer.boft_R: effective block 0 of 1 \(size 8\).*eigenvalue near -1"):
        single_factor_blocks(_half_turn_boft_r(angle), name="layer.boft_R")
    _, check = single_factor_blocks(_half_turn_boft_r(150.0))  # large but safe
    assert check.min_dist_to_minus_one > 0.5 and check.round_trip_f32 < 1e-6


def test_the_measured_round_trip_refuses_a_generic_near_half_turn():
    generator = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    j = torch.zeros(16, 16, dtype=torch.float64)
    j[0, 1], j[1, 0] = -1e3, 1e3  # 179.89 degrees in a random plane
    with pytest.raises(SingleFactorError, match=r"reproduces the block to [0-9.e-]+ \(accepted <= 1e-06\)"):
        single_factor_blocks((u @ j @ u.T).reshape(1, 1, 16, 16), min_dist=0.0)


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_converted_file_layout_and_stock_peft_maths(tmp_path, m, kind, bias):
    x, expected = make_adapter(tmp_path / "multi", kind, m, bias, 0.3, seed=m)
    summary = convert_to_single_factor(tmp_path / "multi", tmp_path / "single")
    be = BLOCK[kind] * 2 ** (m - 1)
    config = json.loads((tmp_path / "single" / "adapter_config.json").read_text())
    assert (config["boft_block_size"], config["boft_block_num"], config["boft_n_butterfly_factor"]) == (be, 0, 1)
    before = load_file(tmp_path / "multi" / "adapter_model.safetensors")
    after = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, tensor in after.items():
        if key.endswith("boft_R"):
            assert tensor.shape == (1, before[key].shape[1] // 2 ** (m - 1), be, be)
        else:
            assert torch.equal(tensor, before[key]), key  # boft_s and biases unchanged
    # the file-size note: N * b**2 * 2**(m-1) values instead of m * N * b**2
    assert summary["values_after"] * m == summary["values_before"] * 2 ** (m - 1)
    # stock PEFT's m = 1 path (its fallback without the CUDA extension) on the converted file == ours at m > 1
    with stock_peft_boft(multi_factor=False):
        stock = PeftModel.from_pretrained(build(kind), tmp_path / "single").eval()
        with torch.no_grad():
            assert max_rel_err(stock(x), expected) <= 1e-5


def test_unpatched_stock_peft_in_a_fresh_process_loads_every_conversion(tmp_path):
    """The strictest form: a child process that never imports boft_plugin, PEFT exactly as installed."""
    cases = []
    for kind in ("linear", "conv"):
        for m in (2, 3, 4):
            directory = tmp_path / f"{kind}{m}"
            x, expected = make_adapter(directory / "multi", kind, m, "all", 0.3, seed=m)
            convert_to_single_factor(directory / "multi", directory / "single")
            torch.save(x, directory / "x.pt")
            torch.save(expected, directory / "y.pt")
            cases.append(
                {
                    "dir": str(directory / "single"),
                    "kind": kind,
                    "input": str(directory / "x.pt"),
                    "expected": str(directory / "y.pt"),
                }
            )
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    env.update(PYTHONPATH=str(CHILD), TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    proc = subprocess.run(
        [sys.executable, str(CHILD / "load_with_stock_peft.py"), str(tmp_path / "cases.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["boft_plugin_imported"]
    for result in report["results"]:
        assert result["layer"] == "peft.tuners.boft.layer.Linear" or result["layer"].endswith("Conv2d")
        assert result["boft_R"][0] == 1 and result["rel"] <= 1e-5, result
    # the original m > 1 file does not load in stock PEFT as installed (its own limitation)
    with stock_peft_boft(multi_factor=False), pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(build("linear"), tmp_path / "linear2" / "multi")


def test_conversion_refused_writes_nothing_and_cli_says_why(tmp_path, capsys):
    from boft_plugin.cli import main as cli_main

    make_adapter(tmp_path / "multi", "linear", 2, "none", 0.3)
    tensors = load_file(tmp_path / "multi" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lin0.boft_R"))
    tensors[key][:, :2] = _half_turn_boft_r(180.0)[:, :2].float().repeat(1, 1, 1, 1)[:, :, :4, :4]
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "multi" / "adapter_model.safetensors")
    assert cli_main(["convert", "--single-factor", str(tmp_path / "multi"), str(tmp_path / "single")]) == 2
    err = capsys.readouterr().err
    assert "lin0.boft_R: effective block 0" in err and "eigenvalue near -1" in err
    assert not (tmp_path / "single").exists()


def test_export_adapter_single_factor_from_a_live_model(tmp_path):
    from boft_plugin.toy.models import tiny_llama

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    boft_plugin.register()
    try:
        model = get_peft_model(
            tiny_llama(), BOFTConfig(target_modules="all-linear", boft_block_size=4, boft_n_butterfly_factor=3)
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "boft_R" in name:
                    param.normal_(0, 0.2)
            expected = model(ids).logits
        boft_plugin.export_adapter(model, tmp_path / "single", single_factor=True)
    finally:
        boft_plugin.unregister()
    with stock_peft_boft(multi_factor=False):
        stock = PeftModel.from_pretrained(tiny_llama(), tmp_path / "single").eval()
        with torch.no_grad():
            assert max_rel_err(stock(ids).logits, expected) <= 1e-5
