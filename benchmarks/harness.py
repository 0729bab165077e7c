"""Run all methods of one case side by side: build each inside its context, warm up, time, measure memory.

The timed repeats are interleaved (round-robin over the methods), so that a burst of load from other processes
spreads over all methods instead of spoiling one row; the share of the machine's CPU that other processes used
during each method's timed steps is recorded (``other_cpu_share``), and so is the process CPU time per step
(``cpu_median_ms``: with ``--threads 1`` a contention-robust measure of the work done).

A stock-PEFT method is skipped when its estimated time (base step plus the dense extra FLOPs at a matmul rate
measured just before the case's stock rows, corrected by the measured/estimated ratio of recent stock rows) times
its number of steps exceeds the budget; the estimate is taken after the base's warm-up and after the cheaper stock
rows' warm-up.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .common import CpuShare, Device, log, measure_memory, release_free_memory, summarize_ms, time_step_ms
from .methods import Method, StockEstimator, boft_factor_count, trainable_params, uses_our_layers


@dataclass
class Workload:
    """One training step split so that the forward alone can be watched by the saved-tensor hooks."""

    model: nn.Module
    forward: Callable[[], torch.Tensor]
    finish: Callable[[torch.Tensor], None]  # backward (+ optimizer step)
    reset: Callable[[], None]  # drop gradients before a step
    exclude: list[torch.Tensor] = field(default_factory=list)  # storages not counted as saved activations

    def step(self) -> None:
        self.reset()
        self.finish(self.forward())


@dataclass(frozen=True)
class RunOptions:
    device: Device
    warmup: int
    repeats: int
    stock_budget_s: float  # skip a stock-PEFT row whose estimated (warm-up + repeats + memory step) time is above
    metric: str = "median_ms"  # what the tables and ratios use: "median_ms" (wall) or "cpu_median_ms"


def _check_backend(method: Method, model: nn.Module, m_actual: int | None) -> None:
    """Fail loudly if registration routed a method to the wrong implementation (it would mislabel a row)."""
    ours = uses_our_layers(model)
    if method.kind == "ours" and not ours:
        raise RuntimeError("register() did not route BOFT to boft_plugin's layers")
    if method.kind == "stock" and ours:
        raise RuntimeError("stock_peft_boft() did not route BOFT to PEFT's layers")
    if method.kind in ("ours", "stock") and m_actual != method.m:
        raise RuntimeError(f"{method.label}: the built layers use m={m_actual}")


@dataclass
class _Entry:
    method: Method
    row: dict
    workload: Workload | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads) per timed step, ms
    cpu: CpuShare = field(default_factory=CpuShare)
    raw_estimate_s: float | None = None

    @property
    def live(self) -> bool:
        return self.workload is not None

    def fail(self, err: BaseException) -> None:
        self.row["status"] = "error"
        self.row["note"] = f"error: {type(err).__name__}: {err}".splitlines()[0][:200]
        self.workload = None
        log(traceback.format_exc())


def _prepare(entry: _Entry, build: Callable[[Method], Workload], opts: RunOptions) -> float | None:
    """Build and warm up; returns the last warm-up step's time (ms, in ``opts.metric``), None on failure."""
    method = entry.method
    t0 = time.perf_counter()
    try:
        with method.context():
            torch.manual_seed(0)
            workload = build(method)
            m_actual = boft_factor_count(workload.model)
            _check_backend(method, workload.model, m_actual)
            entry.row["m_built"] = m_actual
            entry.row["trainable_params"] = trainable_params(workload.model)
            for _ in range(max(1, opts.warmup)):
                cpu0 = time.process_time()
                last = time_step_ms(workload.step, opts.device)
                last_cpu = (time.process_time() - cpu0) * 1e3
        entry.workload = workload
        entry.row["warmup_last_ms"] = round(last, 3)
        entry.row["warmup_last_cpu_ms"] = round(last_cpu, 3)
        if opts.metric == "cpu_median_ms":
            return last_cpu
        entry.row["build_and_warmup_s"] = round(time.perf_counter() - t0, 2)
        return last
    except Exception as err:  # one broken method must not stop the suite
        entry.fail(err)
        return None


def run_case(
    methods: list[Method],
    build: Callable[[Method], Workload],
    opts: RunOptions,
    case: dict,
    estimator: StockEstimator,
    extra_flops: Callable[[Method], float],
) -> list[dict]:
    """Measure every method on ``build``'s workload; returns one row per method (``case`` fields included).

    ``extra_flops(method)`` gives a stock-PEFT method's FLOPs on top of the frozen base (for the estimate).
    """
    entries = [
        _Entry(
            method,
            {**case, "method": method.key, "label": method.label, "kind": method.kind, "m": method.m}
            | {"compiled": method.compiled},
        )
        for method in methods
    ]
    for entry in entries:
        if entry.method.kind == "lora":
            entry.row |= {"r": entry.method.r, "matched_boft_params": entry.method.matched_params}

    # 1. build + warm up, base first; stock rows are estimated (and maybe skipped) once the base time is known.
    base_ms = None
    n_steps = max(1, opts.warmup) + opts.repeats + 1
    recalibrated = False
    for entry in entries:
        method = entry.method
        if method.kind == "stock":
            if not recalibrated:
                estimator.recalibrate()
                recalibrated = True
            entry.row["est_gflops"] = round(estimator.gflops, 1)
            raw = estimator.raw_seconds(base_ms, extra_flops(method))
            est = estimator.seconds(base_ms, extra_flops(method))
            entry.raw_estimate_s = raw
            entry.row["est_step_s"] = round(est, 3)
            if est * n_steps > opts.stock_budget_s:
                entry.row["status"] = "skipped"
                entry.row["note"] = f"skipped (too slow: est. {est:,.1f} s/step)"
                continue
        last = _prepare(entry, build, opts)
        if last is None:
            continue
        if method.kind == "base":
            base_ms = last
        if method.kind == "stock":
            estimator.observe(entry.raw_estimate_s, last / 1e3)

    # 2. timed repeats, round-robin over the methods.
    for _ in range(opts.repeats):
        for entry in entries:
            if not entry.live:
                continue
            try:
                with entry.method.context(), entry.cpu:
                    cpu0 = time.process_time()
                    entry.times.append(time_step_ms(entry.workload.step, opts.device))
                    entry.cpu_times.append((time.process_time() - cpu0) * 1e3)
            except Exception as err:
                entry.fail(err)

    # 3. one untimed step each for memory; then release everything.
    for entry in entries:
        if not entry.live:
            log(f"    {entry.method.label:<34} {entry.row['note']}")
            continue
        try:
            with entry.method.context():
                w = entry.workload
                entry.row |= summarize_ms(entry.times)
                entry.row["cpu_median_ms"] = round(statistics.median(entry.cpu_times), 3)
                entry.row["cpu_min_ms"] = round(min(entry.cpu_times), 3)
                entry.row["cpu_max_ms"] = round(max(entry.cpu_times), 3)
                entry.row["cpu_times_ms"] = [round(t, 3) for t in entry.cpu_times]
                entry.row |= measure_memory(w.forward, w.finish, w.reset, opts.device, w.exclude)
                if not entry.method.compiled:  # a dispatch mode around compiled code would count nothing real
                    entry.row |= count_step_syncs(w)
            entry.row["other_cpu_share"] = entry.cpu.share
            entry.row["status"] = "ok"
            _log_row(entry.row)
        except Exception as err:
            entry.fail(err)
    for entry in entries:
        entry.workload = None
    gc.collect()
    release_free_memory()
    return [entry.row for entry in entries]


def count_step_syncs(workload: Workload) -> dict:
    """Host-synchronising ops of one forward + backward, and of one whole step (the optimizer's included)."""
    from boft_plugin.testing.host_syncs import count_host_syncs

    workload.reset()
    with count_host_syncs() as forward_backward:
        workload.forward().backward()
    workload.reset()
    with count_host_syncs() as whole:
        workload.step()
    return {
        "host_syncs_fwd_bwd": forward_backward.total,
        "host_syncs_step": whole.total,
        "host_syncs_step_ops": dict(whole.counts),
    }


def _log_row(row: dict) -> None:
    share = row.get("other_cpu_share")
    busy = f"  other procs {share:.0%} CPU" if share is not None else ""
    log(
        f"    {row['label']:<34} {row['median_ms']:>10.2f} ms  params {row['trainable_params']:>10,}  "
        f"saved {row['saved_bytes'] / 2**20:8.1f} MiB  dRSS {row['rss_delta_bytes'] / 2**20:8.1f} MiB{busy}"
    )
