"""Reload a run's exports with *stock* PEFT / plain transformers and compare with the trained model's logits.

``boft-plugin verify OUTPUT_DIR`` (or :func:`verify_in_fresh_process`) must run in a process that did not train:
it never registers boft_plugin; the adapter is rebuilt by PEFT's own BOFT (``stock_peft_boft(multi_factor=True)``,
so m > 1 really runs on the CPU) on the base model named in ``adapter_config.json``, and ``<output_dir>/merged``
by plain ``AutoModelForCausalLM``. Both are run on the ids saved in ``probe_logits.pt`` (recipe key
``probe_text``) and compared with the logits saved there by the training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .outputs import MERGED_DIR, PROBE_FILE

DEFAULT_TOLERANCE = 1e-4  # max |difference| relative to max |logit|


def _relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def verify_outputs(output_dir: str | os.PathLike, base_model: str | None = None, merged: bool | None = None) -> dict:
    """Reload and compare in *this* process; returns ``{"adapter_rel_err", "merged_rel_err", ...}``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..stock_peft import stock_peft_boft

    output_dir = Path(output_dir)
    probe = torch.load(output_dir / PROBE_FILE, weights_only=True)
    ids, expected = probe["input_ids"], probe["logits"]
    with open(output_dir / "adapter_config.json") as handle:
        adapter_config = json.load(handle)
    base = base_model or adapter_config.get("base_model_name_or_path")
    report = {"output_dir": str(output_dir), "base_model": base, "n_butterfly_factor": None}
    with stock_peft_boft(multi_factor=True):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(output_dir)).eval()
        layer = next(m for m in model.modules() if hasattr(m, "boft_R") and len(m.boft_R))
        report["n_butterfly_factor"] = int(next(iter(layer.boft_R.values())).shape[0])
        report["stock_layer"] = f"{type(layer).__module__}.{type(layer).__name__}"
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
    report["adapter_rel_err"] = _relative_error(logits, expected)
    merged_dir = output_dir / MERGED_DIR
    if merged or (merged is None and merged_dir.is_dir()):
        plain = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            report["merged_rel_err"] = _relative_error(plain(input_ids=ids).logits.float(), expected)
    return report


def check_report(report: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """Problems in a :func:`verify_outputs` report (empty when every comparison is within ``tolerance``)."""
    problems = []
    for key in ("adapter_rel_err", "merged_rel_err"):
        if key in report and not report[key] <= tolerance:
            problems.append(f"{key}={report[key]:.3g} > {tolerance:g}")
    if "stock_layer" in report and not report["stock_layer"].startswith("peft."):
        problems.append(f"the adapter was not rebuilt by stock PEFT ({report['stock_layer']})")
    return problems


def verify_in_fresh_process(
    *output_dirs: str | os.PathLike, timeout: float = 300, env: dict | None = None, merged: bool | None = None
) -> list[dict]:
    """Run ``python -m boft_plugin verify DIR... --json`` in a new process; return one report per directory."""
    from ..launchers import cpu_env

    cmd = [sys.executable, "-m", "boft_plugin", "verify", *map(str, output_dirs), "--json"]
    if merged is not None:
        cmd.append("--merged" if merged else "--no-merged")
    proc = subprocess.run(cmd, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(reports) != len(output_dirs):
        raise RuntimeError(
            f"verify exited with {proc.returncode} and {len(reports)} report(s) for {len(output_dirs)} "
            f"director(ies):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return reports
