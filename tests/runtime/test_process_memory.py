"""boft_plugin.runtime.process_memory: the glibc calls the recipes make, and the switch that turns them off."""

from __future__ import annotations

import ctypes.util

import pytest

from boft_plugin.runtime import process_memory
from boft_plugin.runtime.process_memory import OPT_OUT, PhasePeaks, limit_heap_retention, malloc_trim, rss_anon_bytes

glibc = pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="needs glibc")


@glibc
def test_heap_calls_run_and_the_opt_out_turns_both_off(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    assert limit_heap_retention() is True
    assert isinstance(malloc_trim(), bool)

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
    assert rss_anon_bytes() > 0
