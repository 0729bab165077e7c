"""Timing, memory and table helpers shared by the BOFT benchmarks.

Measurement rules (the same for every method):

* time: ``time.perf_counter`` around one step on the CPU; ``torch.cuda.Event`` pairs on CUDA. Warm-up steps are
  discarded; the median of the repeats is reported.
* host memory: peak RSS during one extra (untimed) step minus the RSS just before it. Freed heap memory is handed
  back first (``malloc_trim``) so that reused allocator pages do not hide the step's allocations, and the kernel's
  high-water mark is reset through ``/proc/self/clear_refs`` (fallback: a 1 ms psutil sampling thread).
* CUDA memory: ``torch.cuda.max_memory_allocated`` during that step minus ``memory_allocated`` before it.
* saved activations: distinct storages packed by autograd during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters/buffers (and, where asked, the input) excluded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

MIB = 1024**2


# -- device / threads ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """Where and in which dtype a benchmark runs (CPU: float32; CUDA: bfloat16)."""

    kind: str
    dtype: torch.dtype

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()


def select_device(name: str) -> Device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
        return Device("cuda", torch.bfloat16)
    return Device("cpu", torch.float32)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


# -- timing ----------------------------------------------------------------------------------------------------
def time_step_ms(step: Callable[[], None], device: Device) -> float:
    """Wall time of one ``step()`` in milliseconds."""
    if device.is_cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def time_steps_ms(step: Callable[[], None], device: Device, warmup: int, repeats: int) -> list[float]:
    """Run ``warmup`` discarded steps, then return the times of ``repeats`` steps."""
    for _ in range(warmup):
        step()
    device.sync()
    return [time_step_ms(step, device) for _ in range(repeats)]


def summarize_ms(times: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "times_ms": [round(t, 3) for t in times],
    }


def calibrate_gflops(device: Device, n: int = 2048, repeats: int = 3, cpu_time: bool = False) -> float:
    """Dense ``n x n`` matmul throughput (GFLOP/s) in the benchmark dtype: the unit of the stock-PEFT estimates.

    With ``cpu_time`` the rate is per second of process CPU time instead of wall time.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device.torch_device, device.dtype)
    b = torch.randn(n, n, generator=gen).to(device.torch_device, device.dtype)
    if cpu_time:
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            a @ b
            times.append((time.process_time() - t0) * 1e3)
    else:
        times = time_steps_ms(lambda: a @ b, device, warmup=1, repeats=repeats)
    return 2 * n**3 / (max(min(times), 1e-3) / 1e3) / 1e9


def _machine_jiffies() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat`` (steal counts as busy: someone else ran)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _own_jiffies() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


class CpuShare:
    """Re-enterable context manager: share of the machine's CPU time used by *other* processes inside it."""

    def __init__(self) -> None:
        self.other = 0
        self.total = 0

    def __enter__(self) -> CpuShare:
        self._machine = _machine_jiffies()
        self._own = _own_jiffies()
        return self

    def __exit__(self, *exc) -> None:
        machine, own = _machine_jiffies(), _own_jiffies()
        if None in (machine, own, self._machine, self._own):
            return
        busy, total = machine[0] - self._machine[0], machine[1] - self._machine[1]
        self.other += max(0, busy - (own - self._own))
        self.total += total

    @property
    def share(self) -> float | None:
        return round(self.other / self.total, 3) if self.total else None


# -- host memory -----------------------------------------------------------------------------------------------
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """``gc.collect()`` and glibc ``malloc_trim(0)``: give freed heap pages back so the next RSS delta is honest."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


class RssPeak:
    """Context manager: ``delta_bytes`` = peak RSS inside the block minus RSS at entry."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.delta_bytes = 0
        self.method = ""

    def __enter__(self) -> RssPeak:
        release_free_memory()
        self._hwm = _reset_rss_high_water_mark()
        self.before = current_rss_bytes()
        if not self._hwm:
            self._start_sampler()
        return self

    def _start_sampler(self) -> None:
        import psutil

        proc = psutil.Process()
        self._peak = self.before
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, proc.memory_info().rss)
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def __exit__(self, *exc) -> None:
        if self._hwm:
            peak = _status_kib("VmHWM") * 1024
            self.method = "VmHWM"
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, current_rss_bytes())
            self.method = "psutil-sampler"
        self.delta_bytes = max(0, peak - self.before)


# -- saved activations -----------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class SavedTensorBytes:
    """Context manager summing the bytes of distinct storages autograd saves for backward inside the block.

    Storages of the tensors in ``exclude`` (parameters, buffers, the input) are not counted; a storage saved
    twice counts once; a saved view keeps its whole storage alive and is counted as such.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {key[0] for key in map(_storage_key, exclude) if key is not None}
        self.seen: dict[int, int] = {}
        self.n_saved = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.n_saved += 1
        key = _storage_key(t)
        if key is not None and key[0] not in self.excluded:
            self.seen[key[0]] = key[1]
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def measure_memory(
    forward: Callable[[], torch.Tensor],
    finish: Callable[[torch.Tensor], None],
    reset: Callable[[], None],
    device: Device,
    exclude: Iterable[torch.Tensor],
) -> dict:
    """One untimed step: peak RSS delta (and CUDA peak), and the bytes autograd saved during the forward."""
    reset()
    device.sync()
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    saved = SavedTensorBytes(exclude)
    with RssPeak() as rss:
        with saved:
            out = forward()
        finish(out)
        del out
        device.sync()
    result = {
        "rss_delta_bytes": rss.delta_bytes,
        "rss_method": rss.method,
        "saved_bytes": saved.total_bytes,
        "saved_tensors": saved.n_saved,
    }
    if device.is_cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - cuda_before
    return result


# -- formatting ------------------------------------------------------------------------------------------------
def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "—"
    return f"{num / den:.2f}"


def fmt_mib(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / MIB:,.1f}"


def fmt_int(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def markdown_table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0, -1)) -> str:
    """Pipe table; columns in ``left`` (indices) are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    left_set = {i % len(headers) for i in left}
    align_right = [i not in left_set for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, align_right)]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if right else ("-" * (w + 2)) for w, right in zip(widths, align_right))
    return "\n".join([line(headers), sep + "|", *(line(r) for r in rows)])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment_info(device: Device, threads: int) -> dict:
    import peft
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cores_available": available_cores(),
        "threads": threads,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "device": device.kind,
        "dtype": str(device.dtype).replace("torch.", ""),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.is_cuda:
        info["cuda_device"] = torch.cuda.get_device_name()
    try:
        import boft_plugin

        info["boft_plugin"] = boft_plugin.__version__
    except ImportError:  # pragma: no cover
        pass
    return info
