"""benchmarks/gpu_check.py: a clear refusal without CUDA, and its parity check's maths exercised on the CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from boft_plugin.testing.paths import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_without_cuda_it_says_so_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "gpu.json")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no CUDA device" in done.stderr
    assert not (tmp_path / "gpu.json").exists()


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
def test_parity_check_agrees_with_the_oracle_on_the_cpu(gpu_check, mode):
    result = gpu_check.parity(2, mode, device="cpu")
    assert result["ok"], result
    if mode == "fp32":
        assert result["logits_rel_err"] < 1e-5 and result["grad_rel_err"] < 1e-4
