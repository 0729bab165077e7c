"""This process's memory: keep freed weight-sized blocks from staying resident, and read resident memory.

glibc's malloc serves large blocks with mmap only up to a *dynamic* threshold that rises to the largest block freed
(up to 32 MiB); after that, parameter-sized tensors (gathered weights, all-gather buffers, partitions: 8-32 MiB) come
from the heap, and the heap keeps freed memory resident. Measured on a 0.9B fp32 Llama on 2 ranks: +0.4 to 0.6 GiB
of ``RssAnon`` per rank (docs/design.md, "Measured facts"). Fixing the threshold at 1 MiB (what the
``MALLOC_MMAP_THRESHOLD_`` environment variable does at process start) returns such blocks to the OS when freed.

That tuning helps where the weights live in host memory: CPU-only runs. On a host with an accelerator the weights
live in device memory and every mmap'd host block costs page faults, so there it is off unless asked for
(``$BOFT_PLUGIN_HEAP_TUNING=1``); ``$BOFT_PLUGIN_KEEP_MALLOC_DEFAULTS`` turns it off everywhere.

:class:`PhasePeaks` reports, per phase of a run, the peak ``RssAnon`` and, on an accelerator, the peak of the
accelerator's caching allocator (``max_memory_allocated`` / ``max_memory_reserved``, reset at each phase).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["PhasePeaks", "heap_tuning_applies", "limit_heap_retention", "malloc_trim", "rss_anon_bytes"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
OPT_OUT = "BOFT_PLUGIN_KEEP_MALLOC_DEFAULTS"
OPT_IN = "BOFT_PLUGIN_HEAP_TUNING"


def _accelerator_available() -> bool:
    import torch

    return bool(torch.accelerator.is_available())


def heap_tuning_applies() -> bool:
    """Whether :func:`limit_heap_retention` / :func:`malloc_trim` act: CPU-only hosts, or ``$BOFT_PLUGIN_HEAP_TUNING``
    set; never with ``$BOFT_PLUGIN_KEEP_MALLOC_DEFAULTS`` set."""
    if os.environ.get(OPT_OUT):
        return False
    return bool(os.environ.get(OPT_IN)) or not _accelerator_available()


def _libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def limit_heap_retention(mmap_threshold: int = 1 << 20, trim_threshold: int = 16 << 20) -> bool:
    """Serve every allocation of ``mmap_threshold`` bytes or more with its own mmap (given back when freed).

    No-op (False) without glibc or where :func:`heap_tuning_applies` says no. The recipes call it at the start of
    every run.
    """
    libc = _libc() if heap_tuning_applies() else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return (
        libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    )


def malloc_trim() -> bool:
    """Give freed heap memory back to the OS now (glibc ``malloc_trim(0)``); False without glibc or where
    :func:`heap_tuning_applies` says no."""
    libc = _libc() if heap_tuning_applies() else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def rss_anon_bytes(pid: int | str = "self") -> int | None:
    """Anonymous resident memory of a process (``RssAnon`` in ``/proc/PID/status``); None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PhasePeaks:
    """Peak ``RssAnon`` of this process per phase of a run, sampled by a daemon thread (every ``interval`` s).

    ``with PhasePeaks() as peaks: peaks.phase("load"); ...; peaks.phase("train"); ...`` then ``peaks.report()``:
    ``{phase: {"start_mib", "peak_mib", "seconds"}}``, plus ``"gpu_peak_allocated_mib"`` /
    ``"gpu_peak_reserved_mib"`` on an accelerator (its allocator's peaks, reset when each phase starts). Measured
    from the process, never computed from tensor shapes.
    """

    def __init__(self, interval: float = 0.02):
        import threading

        self._device_memory = _accelerator_available()
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="boft-memory", daemon=True)
        self._current: str | None = None
        self._started = 0.0
        self._phases: dict[str, dict[str, float]] = {}

    def __enter__(self) -> PhasePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sample()

    def _sample(self) -> None:
        value = rss_anon_bytes()
        if value is None:
            return
        with self._lock:
            if self._current is not None:
                entry = self._phases[self._current]
                entry["peak_mib"] = max(entry["peak_mib"], value / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def phase(self, name: str) -> None:
        """Close the current phase (one last sample) and start ``name``."""
        import time

        self._sample()
        start = (rss_anon_bytes() or 0) / 2**20
        now = time.monotonic()
        with self._lock:
            if self._current is not None:
                self._phases[self._current]["seconds"] += now - self._started
                self._phases[self._current].update(self._device_peaks())
            self._current, self._started = name, now
            self._phases.setdefault(name, {"start_mib": round(start, 1), "peak_mib": start, "seconds": 0.0})
        if self._device_memory:
            import torch

            torch.accelerator.reset_peak_memory_stats()

    def _device_peaks(self) -> dict[str, float]:
        """The accelerator allocator's peaks since the phase began (MiB); nothing on a CPU-only host."""
        if not self._device_memory:
            return {}
        import torch

        return {
            "gpu_peak_allocated_mib": torch.accelerator.max_memory_allocated() / 2**20,
            "gpu_peak_reserved_mib": torch.accelerator.max_memory_reserved() / 2**20,
        }

    def report(self) -> dict[str, dict[str, float]]:
        """Per phase: resident memory when it began, its peak (MiB), and its duration so far (s)."""
        import time

        self._sample()
        with self._lock:
            phases = {name: dict(entry) for name, entry in self._phases.items()}
            if self._current is not None:
                phases[self._current]["seconds"] += time.monotonic() - self._started
                phases[self._current].update(self._device_peaks())
        return {name: {k: round(v, 1) for k, v in entry.items()} for name, entry in phases.items()}
