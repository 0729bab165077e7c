"""Low-rank approximation of a weight delta: truncated SVD, the rank an error budget needs, LoRA factors.

Pure tensor maths for :mod:`boft_plugin.export.lora`. By Eckart-Young the best rank-``r`` approximation of a matrix
``D`` in the Frobenius norm is its truncated SVD, and its error is known from the singular values alone:

    ||D - D_r||_F / ||D||_F = sqrt(sum_{i > r} s_i^2 / sum_i s_i^2)

so the rank a budget needs is read off the spectrum, without forming ``D_r``. The slow twin that forms ``B @ A`` and
measures the error directly is :func:`.reference.low_rank_error_reference`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Spectrum", "RankChoice", "choose_rank", "lora_factors", "spectrum_of"]


@dataclass(frozen=True)
class Spectrum:
    """The SVD ``delta = U diag(S) Vh`` of one ``(out, width)`` delta, float64.

    Shapes: ``u`` ``(out, k)``, ``s`` ``(k,)`` (descending), ``vh`` ``(k, width)``, ``k = min(out, width)``.
    """

    u: Tensor
    s: Tensor
    vh: Tensor

    @property
    def full_rank(self) -> int:
        return int(self.s.numel())

    def tail_energy(self) -> Tensor:
        """``tail[r] = sum_{i >= r} s_i^2 / sum_i s_i^2`` for ``r = 0 .. k`` (``k + 1`` values; 0 for a zero delta)."""
        energy = self.s.double().square()
        total = energy.sum()
        if total == 0:
            return torch.zeros(energy.numel() + 1, dtype=torch.float64)
        # reversed cumulative sum: exact zeros at the end instead of the round-off of 1 - cumsum
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]) / total
        return torch.cat([tail.cpu(), torch.zeros(1, dtype=torch.float64)])

    def relative_error(self, rank: int) -> float:
        """``||D - D_r||_F / ||D||_F`` of the rank-``rank`` truncation (0 for a zero delta)."""
        return math.sqrt(max(float(self.tail_energy()[min(rank, self.full_rank)]), 0.0))

    def energy_kept(self, rank: int) -> float:
        """``sum_{i < r} s_i^2 / sum_i s_i^2`` (1 for a zero delta)."""
        return 1.0 - float(self.tail_energy()[min(rank, self.full_rank)])


def spectrum_of(delta: Tensor) -> Spectrum:
    """The thin SVD of ``delta`` ``(out, width)`` in float64, on the tensor's device."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return Spectrum(u, s, vh)


@dataclass(frozen=True)
class RankChoice:
    """The rank written for one layer and what it costs (relative Frobenius error of the delta, energy kept)."""

    rank: int
    relative_error: float
    energy_kept: float
    budget_met: bool


def _snap_up(rank: int, allowed: Sequence[int]) -> int | None:
    """The smallest allowed rank ``>= rank`` (None when there is none)."""
    fits = [value for value in sorted(allowed) if value >= rank]
    return fits[0] if fits else None


def choose_rank(
    spectrum: Spectrum,
    rank: int | None = None,
    max_error: float | None = None,
    max_rank: int | None = None,
    allowed: Sequence[int] | None = None,
) -> RankChoice:
    """The rank for one layer: ``rank`` as given, or the smallest rank whose error is ``<= max_error``.

    ``max_rank`` caps the budget's rank; ``allowed`` (a server's ranks) snaps the rank up to the next allowed value.
    No rank exceeds ``full_rank`` (``min(out, width)``): at full rank the factors are exact, and zeros beyond it
    would add nothing. When no rank within the cap and the allowed values meets ``max_error``, the largest such
    rank is chosen and ``budget_met`` is False. Exactly one of ``rank`` / ``max_error`` is given.
    """
    if (rank is None) == (max_error is None):
        raise ValueError("give exactly one of rank and max_error")
    if rank is not None:
        rank = min(rank, spectrum.full_rank)
        return RankChoice(rank, spectrum.relative_error(rank), spectrum.energy_kept(rank), True)
    tail = spectrum.tail_energy()
    # smallest r with sqrt(tail[r]) <= max_error; r = full_rank always qualifies (tail 0)
    needed = int(torch.nonzero(tail <= max_error * max_error)[0])
    needed = max(needed, 1)  # a LoRA layer has rank >= 1 (a zero delta is written as zeros)
    cap = max_rank
    if allowed is not None:
        snapped = _snap_up(needed, allowed)
        allowed_under_cap = [value for value in allowed if cap is None or value <= cap]
        if snapped is not None and (cap is None or snapped <= cap):
            chosen = snapped
        else:
            chosen = max(allowed_under_cap) if allowed_under_cap else min(allowed)
    else:
        chosen = needed if cap is None else min(needed, cap)
    chosen = min(chosen, spectrum.full_rank)
    error = spectrum.relative_error(chosen)
    return RankChoice(chosen, error, spectrum.energy_kept(chosen), error <= max_error)


def lora_factors(spectrum: Spectrum, rank: int) -> tuple[Tensor, Tensor]:
    """LoRA factors with ``B @ A = D_rank`` (the rank-``rank`` truncation), the singular values split evenly.

    Returns:
        ``A`` ``(rank, width)`` and ``B`` ``(out, rank)`` in float64; rows of ``A`` / columns of ``B`` beyond
        ``full_rank`` are zero.
    """
    k = min(rank, spectrum.full_rank)
    root = spectrum.s[:k].sqrt()
    a = spectrum.vh[:k] * root[:, None]
    b = spectrum.u[:, :k] * root[None, :]
    if rank > k:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b
