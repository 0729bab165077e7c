"""Reload a run's exports with *stock* PEFT / plain transformers and compare with the trained model's logits.

``boft-plugin verify OUTPUT_DIR`` (or :func:`verify_in_fresh_process`) must run in a process that did not train.
For each adapter it reports separately:

- **oracle**: stock PEFT's own BOFT maths (``stock_peft_boft(multi_factor=True)``: its real m-factor path, also on
  machines without its CUDA extension) on the base model named in ``adapter_config.json``;
- **as installed**: stock PEFT exactly as it runs on this machine. Without its CUDA extension (every CPU, many GPU
  setups) it can load only adapters with ``boft_n_butterfly_factor = 1``; an m > 1 adapter then fails to load
  (PEFT's own limitation), which is reported with the remedy (``boft-plugin convert --single-factor``), not hidden;
- **merged**: ``<output_dir>/merged`` with plain ``AutoModelForCausalLM``;
- **single factor**: ``<output_dir>/single_factor`` (recipe key ``export_single_factor``) with stock PEFT as
  installed (no patch at all), against the training run's logits and against boft-plugin on the original adapter;
- **lora**: ``<output_dir>/lora`` (recipe keys ``export_lora_*``) with stock PEFT's LoRA: its logit error and KL
  against the training run's logits, beside the delta error its conversion recorded; it must match when that
  conversion was exact (every layer at full rank).

The expected logits are those the training run saved (``probe_logits.pt``, recipe key ``probe_text``); when none
were saved, verify makes its own probe from the tokenizer and compares with boft-plugin's own reload of the adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VerifyError
from ..ops.compare import max_relative_error
from .layout import LORA_DIR, LORA_REPORT, MERGED_DIR, PROBE_FILE, SINGLE_FACTOR_DIR

DEFAULT_TOLERANCE = 1e-4  # max |difference| relative to max |logit|, float32 runs
LOW_PRECISION_TOLERANCE = 2e-2  # runs that computed in bf16/fp16 (FSDP2 param_dtype, DeepSpeed bf16): measured 7e-3
OWN_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass(frozen=True)
class BaseModel:
    """The base model a run's adapter is reloaded onto: its path, and the quantisation the run trained on."""

    path: str
    quantization_config: dict | None = None  # transformers' BitsAndBytesConfig.to_dict() (probe_logits.pt)

    def __str__(self) -> str:
        return self.path

    def full_precision(self) -> BaseModel:
        return BaseModel(self.path)


def _load_base(base: BaseModel, output_dir: Path, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if base.quantization_config is not None:  # the same quantisation as the training run, placed while loading
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig.from_dict(base.quantization_config)
        kwargs = {"quantization_config": config, "device_map": {"": device or "cpu"}}
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, **kwargs)
        return model if device is None or kwargs else model.to(device)
    except (OSError, ValueError, ImportError) as err:
        raise VerifyError(
            f"{output_dir}: the base model {base.path!r} (base_model_name_or_path in adapter_config.json) cannot be "
            f"loaded ({_first_line(err)}); pass --base_model PATH"
        ) from None


def _stock_logits(adapter_dir: Path, base: BaseModel, input_ids, multi_factor: bool):
    """Logits of stock PEFT's BOFT on ``adapter_dir``: its real m-factor maths (oracle) or as on this machine."""
    import torch
    from peft import PeftModel

    from ..stock_peft import stock_peft_boft

    with stock_peft_boft(multi_factor=multi_factor):
        model = PeftModel.from_pretrained(_load_base(base, adapter_dir), str(adapter_dir)).eval()
        layer = next(m for m in model.modules() if hasattr(m, "boft_R") and len(m.boft_R))
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
    factors = int(next(iter(layer.boft_R.values())).shape[0])
    return logits, factors, f"{type(layer).__module__}.{type(layer).__name__}"


def _stock_on_cuda(adapter_dir: Path, base: BaseModel, input_ids, expected, factors: int) -> dict:
    """Stock PEFT unpatched on CUDA tensors: whether its extension built (``extension``: ``built``, ``fell back
    to one factor`` or ``failed``), and its logits against ours."""
    import torch
    from peft import PeftModel

    from ..stock_peft import stock_peft_as_installed

    device = torch.device("cuda", torch.cuda.current_device())
    try:
        with stock_peft_as_installed():
            model = PeftModel.from_pretrained(_load_base(base, adapter_dir, device), str(adapter_dir)).eval()
            layer = next(m for m in model.modules() if hasattr(m, "boft_R") and len(m.boft_R))
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device)).logits.float().cpu()
    except Exception as err:  # noqa: BLE001 - whatever stock PEFT raises is the finding
        from peft.tuners.boft import layer as peft_boft_layer

        # PEFT caches a built extension; None after the attempt: it did not build and PEFT went to one factor
        fell_back = peft_boft_layer._FBD_CUDA is None and factors > 1
        return {
            "extension": "fell back to one factor" if fell_back else "failed",
            "loads": False,
            "note": _first_line(err),
        }
    built = bool(getattr(layer, "fbd_cuda_available", False))
    got = int(next(iter(layer.boft_R.values())).shape[0])
    return {
        "extension": "built" if built else "fell back to one factor",
        "loads": True,
        "factors": got,
        "rel_err": max_relative_error(logits, expected),
    }


def _as_installed(adapter_dir: Path, base: BaseModel, input_ids, expected, config: dict) -> dict:
    """Stock PEFT exactly as it behaves here (see the module docstring)."""
    import torch

    has_extension_route = torch.cuda.is_available()
    factors = int(config.get("boft_n_butterfly_factor") or 1)
    result: dict = {"machine": "CUDA available" if has_extension_route else "no CUDA: PEFT's fbd_cuda cannot build"}
    if has_extension_route:  # PEFT builds its extension itself, unpatched, on this machine's GPU
        return {**result, **_stock_on_cuda(adapter_dir, base, input_ids, expected, factors)}
    try:  # without CUDA PEFT falls back to one factor; this runs that fallback without its failing build attempt
        logits, got, _ = _stock_logits(adapter_dir, base, input_ids, multi_factor=False)
    except Exception as err:  # noqa: BLE001
        note = _first_line(err)
        if factors > 1:
            note = (
                f"stock PEFT without its CUDA extension trains and loads only 1 butterfly factor; this adapter has "
                f"{factors}. Export an equivalent single-factor adapter: boft-plugin convert --single-factor SRC DST"
            )
        return {**result, "loads": False, "note": note}
    return {**result, "loads": True, "factors": got, "rel_err": max_relative_error(logits, expected)}


def _ours_logits(adapter_dir: Path, base: BaseModel, input_ids):
    """boft-plugin's own reload of ``adapter_dir`` (float32), leaving PEFT's routing as it was."""
    import torch

    from ..tuner.registry import is_registered, unregister
    from .loading import load_adapter

    was_registered = is_registered()
    try:
        model = load_adapter(_load_base(base, adapter_dir), adapter_dir).eval()
        with torch.no_grad():
            return model(input_ids=input_ids).logits.float()
    finally:
        if not was_registered:
            unregister()


def _single_factor_report(directory: Path, original: Path, base: BaseModel, input_ids, expected) -> dict:
    """Stock PEFT as installed on the single-factor export, against the probe and against ours on the original."""
    config = json.loads((directory / "adapter_config.json").read_text())
    report = {"dir": str(directory), "block_size": config.get("boft_block_size")}
    report["as_installed"] = _as_installed(directory, base, input_ids, expected, config)
    if report["as_installed"].get("loads"):
        logits, _, _ = _stock_logits(directory, base, input_ids, multi_factor=False)
        report["vs_ours_on_original"] = max_relative_error(logits, _ours_logits(original, base, input_ids))
    return report


LORA_EXACT = 1e-6  # recorded relative delta error below which a LoRA conversion counts as exact (full rank)


def _lora_report(directory: Path, base: BaseModel, input_ids, expected) -> dict:
    """Stock PEFT's LoRA on ``<output_dir>/lora`` against the probe, with the error its conversion recorded."""
    import torch
    from peft import PeftModel

    from .lora_probe import kl_per_token

    recorded = json.loads((directory / LORA_REPORT).read_text()) if (directory / LORA_REPORT).is_file() else {}
    report = {"dir": str(directory), "recorded_max_delta_error": recorded.get("max_relative_error")}
    try:
        model = PeftModel.from_pretrained(_load_base(base, directory), str(directory)).eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
    except Exception as err:  # noqa: BLE001 - whatever stock PEFT raises is the finding
        return {**report, "loads": False, "note": _first_line(err)}
    kl = kl_per_token(expected, logits)
    return {
        **report,
        "loads": True,
        "rel_err": max_relative_error(logits, expected),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def _probe(output_dir: Path, base: BaseModel):
    """(input ids, expected logits, where the expectation comes from, the dtype they were computed in)."""
    import torch

    probe_file = output_dir / PROBE_FILE
    if probe_file.is_file():
        probe = torch.load(probe_file, weights_only=True)
        return probe["input_ids"], probe["logits"], f"training run ({PROBE_FILE})", probe.get("compute_dtype")
    from transformers import AutoTokenizer

    source = output_dir if (output_dir / "tokenizer_config.json").is_file() else base.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise VerifyError(
            f"{output_dir}: no {PROBE_FILE} and no tokenizer to make a probe ({_first_line(err)})"
        ) from None
    ids = tokenizer(OWN_PROBE_TEXT, return_tensors="pt").input_ids
    expected = _ours_logits(output_dir, base, ids)
    return ids, expected, f"boft-plugin reload (no {PROBE_FILE} saved)", str(expected.dtype)


def _probe_quantisation(output_dir: Path) -> dict | None:
    """The quantisation the training run's base had (recorded in its probe), None for a full-precision base."""
    import torch

    probe_file = output_dir / PROBE_FILE
    if not probe_file.is_file():
        return None
    recorded = torch.load(probe_file, weights_only=True).get("quantization_config")
    return json.loads(recorded) if recorded else None


def _bf16_quantised_kernel(quantization_config: dict, input_ids) -> bool:
    """A bitsandbytes 4-bit base whose CPU inference kernel computes in bf16 here (oracle compared at bf16 level)."""
    if not quantization_config.get("load_in_4bit") or input_ids.device.type != "cpu":
        return False
    from ..runtime.upstream import bnb_cpu_kernel_is_bf16

    return bnb_cpu_kernel_is_bf16()


def reload_and_compare(
    adapter_dir: str | os.PathLike,
    base_model: str | BaseModel,
    input_ids,
    expected,
    merged_dir: str | os.PathLike | None = None,
) -> dict:
    """Oracle and merged comparisons of one exported adapter (see the module docstring).

    On a quantised base the oracle runs on the same quantised base; the merged model (full precision) is compared
    with boft-plugin's reload of the adapter onto the full-precision base, which is what it was merged into.
    """
    adapter_dir = Path(adapter_dir)
    base = base_model if isinstance(base_model, BaseModel) else BaseModel(str(base_model))
    logits, factors, layer = _stock_logits(adapter_dir, base, input_ids, multi_factor=True)
    report = {
        "base_model": base.path,
        "n_butterfly_factor": factors,
        "stock_layer": layer,
        "oracle_rel_err": max_relative_error(logits, expected),
    }
    if base.quantization_config is not None:
        report["quantised_base"] = base.quantization_config.get("quant_method", "quantised")
        if _bf16_quantised_kernel(base.quantization_config, input_ids):
            report["quantised_kernel_dtype"] = "torch.bfloat16"
    if merged_dir is not None:
        import torch
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        reference = expected
        if base.quantization_config is not None:
            reference = _ours_logits(adapter_dir, base.full_precision(), input_ids)
            report["merged_against"] = "boft-plugin on the full-precision base"
        with torch.no_grad():
            report["merged_rel_err"] = max_relative_error(plain(input_ids=input_ids).logits.float(), reference)
    return report


@dataclass
class VerifyReport:
    """What :func:`verify_outputs` found for one run directory.

    ``comparisons`` holds the figures (``oracle_rel_err``, ``merged_rel_err``, ``as_installed``, ``single_factor``,
    ...) under the keys the JSON output uses; :meth:`problems` says which comparisons that must hold do not.
    """

    output_dir: str
    comparisons: dict = field(default_factory=dict)

    def problems(self, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
        return check_report(self.comparisons, tolerance)

    def as_dict(self, tolerance: float = DEFAULT_TOLERANCE) -> dict:
        """The figures plus ``ok`` and ``problems`` (what ``boft-plugin verify --json`` prints)."""
        problems = self.problems(tolerance)
        return {"output_dir": self.output_dir, **self.comparisons, "ok": not problems, "problems": problems}


def verify_outputs(
    output_dir: str | os.PathLike, base_model: str | None = None, merged: bool | None = None
) -> VerifyReport:
    """Reload and compare in *this* process (see the module docstring); raises :class:`VerifyError`."""
    output_dir = Path(output_dir)
    config_file = output_dir / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise VerifyError(
            f"{config_file}: cannot be read ({_first_line(err)}); is {output_dir} a run's output_dir?"
        ) from None
    base_path = base_model or config.get("base_model_name_or_path")
    if not base_path:
        raise VerifyError(f"{config_file} names no base model; pass --base_model PATH")
    if os.path.isabs(os.path.expanduser(base_path)) and not os.path.exists(os.path.expanduser(base_path)):
        raise VerifyError(
            f"{output_dir}: the base model {base_path} (base_model_name_or_path in adapter_config.json) does not "
            "exist; pass --base_model PATH"
        )
    base = BaseModel(base_path, _probe_quantisation(output_dir))
    ids, expected, source, compute_dtype = _probe(output_dir, base)
    merged_dir = output_dir / MERGED_DIR
    check_merged = merged or (merged is None and merged_dir.is_dir())
    report = {"expected": source, "probe_compute_dtype": compute_dtype}
    report.update(reload_and_compare(output_dir, base, ids, expected, merged_dir if check_merged else None))
    report["as_installed"] = _as_installed(output_dir, base, ids, expected, config)
    single = output_dir / SINGLE_FACTOR_DIR
    if (single / "adapter_config.json").is_file():
        report["single_factor"] = _single_factor_report(single, output_dir, base, ids, expected)
    if (output_dir / LORA_DIR / "adapter_config.json").is_file():
        report["lora"] = _lora_report(output_dir / LORA_DIR, base, ids, expected)
    return VerifyReport(str(output_dir), report)


def check_report(report: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """Problems in a :func:`verify_outputs` report (empty when every comparison that must hold holds).

    Stock PEFT as installed failing to load an m > 1 adapter without CUDA is PEFT's documented limitation, not a
    problem of the adapter; for a single-factor adapter (m = 1) it must load and match.
    """
    problems = []
    if report.get("probe_compute_dtype") in ("torch.bfloat16", "torch.float16"):
        tolerance = max(tolerance, LOW_PRECISION_TOLERANCE)  # a reload in float32 against a bf16-computed probe
    for key in ("oracle_rel_err", "merged_rel_err"):
        # the 4-bit oracle runs bitsandbytes' bf16 CPU kernel where the CPU has one; the merged model is float32
        limit = LOW_PRECISION_TOLERANCE if key == "oracle_rel_err" and report.get("quantised_kernel_dtype") else 0
        limit = max(tolerance, limit)
        if key in report and not report[key] <= limit:
            problems.append(f"{key}={report[key]:.3g} > {limit:g}")
    if "stock_layer" in report and not report["stock_layer"].startswith("peft."):
        problems.append(f"the adapter was not rebuilt by stock PEFT ({report['stock_layer']})")
    installed = report.get("as_installed")
    if installed and report.get("n_butterfly_factor") == 1:
        if not installed.get("loads"):
            problems.append(f"stock PEFT as installed cannot load this single-factor adapter: {installed.get('note')}")
        elif not installed["rel_err"] <= tolerance:
            problems.append(f"as_installed rel_err={installed['rel_err']:.3g} > {tolerance:g}")
    single = report.get("single_factor")
    if single:
        installed = single["as_installed"]
        if not installed.get("loads"):
            problems.append(f"stock PEFT as installed cannot load {single['dir']}: {installed.get('note')}")
        else:
            for key, value in (
                ("rel_err", installed["rel_err"]),
                ("vs_ours_on_original", single["vs_ours_on_original"]),
            ):
                if not value <= tolerance:
                    problems.append(f"single_factor {key}={value:.3g} > {tolerance:g}")
    lora = report.get("lora")
    if lora:
        if not lora.get("loads"):
            problems.append(f"stock PEFT cannot load {lora['dir']} as LoRA: {lora.get('note')}")
        elif (lora.get("recorded_max_delta_error") or 0.0) <= LORA_EXACT and not lora["rel_err"] <= tolerance:
            problems.append(f"lora rel_err={lora['rel_err']:.3g} > {tolerance:g} for an exact (full-rank) conversion")
    return problems


def verify_in_fresh_process(
    *output_dirs: str | os.PathLike, timeout: float = 300, env: dict | None = None, merged: bool | None = None
) -> list[dict]:
    """Run ``python -m boft_plugin verify DIR... --json`` in a new process; return one report per directory."""
    from ..runtime.launchers import cpu_env

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
