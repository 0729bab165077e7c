"""The GPU check: everything the CPU cannot prove, on one CUDA GPU, in under 8 minutes.

    python benchmarks/gpu_check.py [--json outputs/gpu_check.json] [--skip-speed]

1. parity with stock PEFT's own BOFT maths (``boft_plugin.stock_peft``, the oracle) on CUDA tensors: logits and the
   gradients of ``boft_R`` / ``boft_s``, m = 1..4, in float32 with TF32 off, in bf16 weights, and under autocast;
2. the single-rank NCCL route of every engine through the CLI (``torch.distributed.run --nproc_per_node 1``):
   plain DDP, FSDP2 pre-sharding with bf16 mixed precision, DeepSpeed ZeRO-3 with ``bf16: true`` (torch_autocast),
   each exporting the adapter and the merged model, then ``boft-plugin verify`` (which runs stock PEFT unpatched on
   CUDA and says whether its ``fbd_cuda`` extension built);
3. the GPU peak memory of each run (``max_memory_allocated`` / ``reserved`` per phase, from the run summary);
4. the speed table of ``benchmarks/bench_real_model.py --device cuda`` (SmolLM2-135M: base, LoRA, ours m=1/2/4,
   stock PEFT).

Writes one JSON (``--json``) and prints a table; exits 0 when every check passed, 1 otherwise, and 2 with a one-line
message on a machine without a CUDA device. The figures go into benchmarks/RESULTS.md with the date and the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_CUDA = (
    "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a host with an NVIDIA GPU "
    "and a CUDA build of torch (benchmarks/README.md, 'GPU check')"
)
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "autocast": 5e-2}  # bf16: measured on the CPU up to 2.7e-2 (m=4)
ROUTE_TIMEOUT_S = 240


def parity(factors: int, mode: str, device=None) -> dict:
    """Ours vs the oracle on one tiny Llama (on the current CUDA device unless ``device`` is given), the same random
    adapter in both: max relative errors of the logits and of the adapter's gradients."""
    import torch
    from peft import BOFTConfig, get_peft_model

    import boft_plugin
    from boft_plugin.ops.compare import max_relative_error
    from boft_plugin.stock_peft import stock_peft_boft
    from boft_plugin.toy.models import tiny_llama

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    config = dict(boft_block_size=8, boft_n_butterfly_factor=factors, target_modules=["q_proj", "v_proj", "down_proj"])
    size = dict(hidden_size=128 * factors, intermediate_size=256 * factors)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0)).to(device)

    def run(model):
        with torch.autocast(device.type, torch.bfloat16, enabled=mode == "autocast"):
            logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    with stock_peft_boft(multi_factor=True):
        stock = get_peft_model(tiny_llama(seed=1, **size).to(device, dtype), BOFTConfig(**config))
        with torch.no_grad():
            generator = torch.Generator(device=device).manual_seed(2)
            for name, p in stock.named_parameters():
                if "boft_R" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=generator, device=device))
                elif "boft_s" in name:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator, device=device))
        state = {k: v.clone() for k, v in stock.state_dict().items()}
        want, want_grads = run(stock)
    boft_plugin.register()
    try:
        ours = get_peft_model(tiny_llama(seed=1, **size).to(device, dtype), BOFTConfig(**config))
        ours.load_state_dict(state)
        got, got_grads = run(ours)
    finally:
        boft_plugin.unregister()
    grad_err = max(max_relative_error(got_grads[n], want_grads[n]) for n in want_grads)
    logits_err = max_relative_error(got, want)
    ok = logits_err <= TOLERANCE[mode] and grad_err <= TOLERANCE[mode]
    return {"m": factors, "mode": mode, "logits_rel_err": logits_err, "grad_rel_err": grad_err, "ok": ok}


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _launch(cmd: list[str], what: str) -> tuple[bool, str]:
    try:
        done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=ROUTE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"{what}: timed out after {ROUTE_TIMEOUT_S} s"
    output = done.stdout + done.stderr
    return done.returncode == 0, output[-3000:]


def engine_route(name: str, work: Path) -> dict:
    """One SFT through the CLI on one rank (NCCL), its exports, then verify."""
    from boft_plugin.runtime.launchers import accelerate_cmd, torchrun_cmd
    from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

    data = write_tiny_data(work / "data")
    out = work / name
    extra = {"export_merged": True, "bf16": True}
    if name == "fsdp2_pre_shard":
        extra["fsdp2_pre_shard"] = True
    recipe = write_recipe(work / f"{name}.yaml", tiny_recipe("sft", out, data, **extra))
    cli = ["boft_plugin", "sft", "--config", recipe]
    if name == "zero3":
        config = str(REPO / "integrations" / "accelerate" / "zero3_gpu.yaml")
        cmd = accelerate_cmd(config, ["-m", *cli], num_processes=1)
    else:
        cmd = torchrun_cmd(cli, nproc_per_node=1, module=True)
    started = time.monotonic()
    ok, tail = _launch(cmd, name)
    result: dict = {"engine": name, "trained": ok, "seconds": round(time.monotonic() - started, 1)}
    if not ok:
        return {**result, "ok": False, "tail": tail}
    summary = json.loads((out / "boft_run_summary.json").read_text())
    result["memory_by_phase"] = (summary.get("rss_anon_mib_by_rank") or [None])[0]
    ok, tail = _launch([sys.executable, "-m", "boft_plugin", "verify", str(out)], f"verify {name}")
    result["verify_ok"] = ok
    result["verify_tail"] = tail[-1500:]
    result["ok"] = ok
    return result


def speed(work: Path) -> dict:
    out = work / "bench_real_model.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_real_model.py"), "--device", "cuda", "--models", "smollm2"]
    cmd += ["--threads", "1", "--repeats", "7", "--json", str(out)]
    ok, tail = _launch(cmd, "bench_real_model")
    return {"ok": ok, "table": tail if ok else None, "tail": None if ok else tail}


def _guarded(check, *args) -> dict:
    """A check's result, or its failure as a result (one failing check does not hide the others)."""
    try:
        return check(*args)
    except Exception as err:  # noqa: BLE001 - every failure is a finding to report
        labels = {"m": args[0], "mode": args[1]} if check is parity else {"engine": args[0], "trained": False}
        return {**labels, "ok": False, "error": f"{type(err).__name__}: {err}", "seconds": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=REPO / "outputs" / "gpu_check.json")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the speed table (about 2 minutes)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    started = time.monotonic()
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    report["parity"] = [_guarded(parity, m, mode) for m in (1, 2, 3, 4) for mode in ("fp32", "bf16", "autocast")]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        report["engines"] = [_guarded(engine_route, name, work) for name in ("ddp", "fsdp2_pre_shard", "zero3")]
        report["speed"] = None if args.skip_speed else speed(work)
    report["seconds"] = round(time.monotonic() - started, 1)
    checks = [r["ok"] for r in report["parity"]] + [r["ok"] for r in report["engines"]]
    checks += [report["speed"]["ok"]] if report["speed"] else []
    report["ok"] = all(checks)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    staging = args.json.with_name(args.json.name + ".tmp")
    staging.write_text(json.dumps(report, indent=2))
    os.replace(staging, args.json)

    print(f"GPU check on {report['gpu']} (torch {report['torch']}, CUDA {report['cuda']}), {report['seconds']} s")
    print("| m | mode | logits rel err | grad rel err | ok |\n|---|---|---|---|---|")
    for r in report["parity"]:
        if "error" in r:
            print(f"| {r['m']} | {r['mode']} | {r['error'][:60]} | - | False |")
            continue
        print(f"| {r['m']} | {r['mode']} | {r['logits_rel_err']:.2e} | {r['grad_rel_err']:.2e} | {r['ok']} |")
    print("\n| engine | trained | verify | s | GPU peak allocated MiB (train) |\n|---|---|---|---|---|")
    for r in report["engines"]:
        train = (r.get("memory_by_phase") or {}).get("train", {})
        peak = train.get("gpu_peak_allocated_mib", "-")
        print(f"| {r['engine']} | {r['trained']} | {r.get('verify_ok', '-')} | {r['seconds']} | {peak} |")
    if report["speed"] and report["speed"]["table"]:
        print("\n" + report["speed"]["table"])
    print(f"\n{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}; details: {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
