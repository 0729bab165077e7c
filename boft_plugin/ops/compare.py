"""How two results are compared everywhere (verify, tests, benchmarks): one definition of relative error."""

from __future__ import annotations

from torch import Tensor


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (0-safe): the figure every tolerance here refers to."""
    difference = (actual.double() - expected.double()).abs().max()
    return (difference / expected.double().abs().max().clamp_min(1e-30)).item()
