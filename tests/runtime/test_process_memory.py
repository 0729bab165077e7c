"""boft_plugin.runtime.process_memory: the glibc calls the recipes make (CPU-only hosts, or asked for), the switch
that turns them off, and the per-phase peaks (RssAnon, and the accelerator allocator's, reset per phase)."""

from __future__ import annotations

import ctypes.util

import pytest

from boft_plugin.runtime import process_memory
from boft_plugin.runtime.process_memory import OPT_IN, OPT_OUT, PhasePeaks, limit_heap_retention, malloc_trim

glibc = pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="needs glibc")


@glibc
def test_heap_calls_run_and_the_opt_out_turns_both_off(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    monkeypatch.delenv(OPT_IN, raising=False)
    monkeypatch.setattr(process_memory, "_accelerator_available", lambda: False)
    assert limit_heap_retention() is True  # the real glibc accepts both settings

    class RecordingLibc:  # answers like glibc, records what was called
        def __init__(self):
            self.calls = []

        def mallopt(self, option, value):
            self.calls.append(("mallopt", option, value))
            return 1

        def malloc_trim(self, pad):
            self.calls.append(("malloc_trim", pad))
            return 1

    fake = RecordingLibc()
    monkeypatch.setattr(process_memory, "_libc", lambda: fake)
    assert limit_heap_retention(mmap_threshold=1 << 20) is True and malloc_trim() is True
    assert [c[0] for c in fake.calls] == ["mallopt", "mallopt", "malloc_trim"]
    assert fake.calls[0] == ("mallopt", -3, 1 << 20)  # M_MMAP_THRESHOLD

    fake.calls.clear()
    monkeypatch.setenv(OPT_OUT, "1")
    assert limit_heap_retention() is False and malloc_trim() is False
    assert fake.calls == []


def test_heap_tuning_is_off_on_an_accelerator_host_unless_asked(monkeypatch):
    calls = []

    class RecordingLibc:
        def mallopt(self, option, value):
            calls.append("mallopt")
            return 1

        def malloc_trim(self, pad):
            calls.append("malloc_trim")
            return 1

    monkeypatch.setattr(process_memory, "_libc", RecordingLibc)
    monkeypatch.setattr(process_memory, "_accelerator_available", lambda: True)
    monkeypatch.delenv(OPT_OUT, raising=False)
    monkeypatch.delenv(OPT_IN, raising=False)
    assert limit_heap_retention() is False and malloc_trim() is False and calls == []
    monkeypatch.setenv(OPT_IN, "1")
    assert limit_heap_retention() is True and malloc_trim() is True
    assert calls == ["mallopt", "mallopt", "malloc_trim"]


def test_phase_peaks_report_the_accelerator_peak_of_each_phase(monkeypatch):
    import torch

    allocated = iter([100, 300])  # bytes (MiB below) the allocator reports at the end of each phase
    resets = []
    monkeypatch.setattr(process_memory, "_accelerator_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "reset_peak_memory_stats", lambda *a: resets.append(True))
    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", lambda *a: next(allocated) * 2**20)
    monkeypatch.setattr(torch.accelerator, "max_memory_reserved", lambda *a: 512 * 2**20)
    peaks = PhasePeaks(interval=1.0)
    peaks.phase("load")
    peaks.phase("train")
    report = peaks.report()
    assert len(resets) == 2  # one reset as each phase begins
    assert report["load"]["gpu_peak_allocated_mib"] == 100 and report["train"]["gpu_peak_allocated_mib"] == 300
    assert report["train"]["gpu_peak_reserved_mib"] == 512


def test_phase_peaks_measure_an_allocation():
    import torch

    with PhasePeaks(interval=0.005) as peaks:
        peaks.phase("small")
        peaks.phase("big")
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        import time

        time.sleep(0.05)
        del block
    report = peaks.report()
    assert set(report) == {"small", "big"}
    assert report["big"]["peak_mib"] - report["big"]["start_mib"] >= 48
    assert not any(key.startswith("gpu_") for entry in report.values() for key in entry)  # a CPU-only host
