"""What a BOFT -> LoRA conversion is asked (:class:`LoraOptions`) and what it cost (:class:`LoraReport`).

The report is what ``lora_conversion.json`` holds and ``boft-plugin convert --to-lora`` prints: per layer the
delta's shape, full rank, the rank written, the relative Frobenius error of the delta and the energy kept; the
layers over budget; and the probe (:mod:`.lora_probe`). See docs/lora.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import LoraBudgetError, LoraConversionError
from ..ops.low_rank import RankChoice, choose_rank

__all__ = ["SERVER_RANKS", "LayerConversion", "LoraOptions", "LoraReport", "budget_error"]

SERVER_RANKS: dict[str, tuple[int, ...]] = {"vllm": (1, 8, 16, 32, 64, 128, 256, 320, 512)}
KIND = "lora_adapter"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraOptions:
    """How ranks are chosen: ``rank`` for every layer, or the smallest rank meeting ``max_error`` (relative
    Frobenius error of each layer's delta), capped by ``max_rank``; ``ranks`` names a server whose allowed ranks
    every layer's rank is snapped up to (:data:`SERVER_RANKS`)."""

    rank: int | None = None
    max_error: float | None = None
    max_rank: int | None = None
    ranks: str | None = None

    def check(self) -> None:
        """Raise :class:`LoraConversionError` for options that cannot work (before anything is read)."""
        if (self.rank is None) == (self.max_error is None):
            raise LoraConversionError("give exactly one of rank (--rank R) and max_error (--max-error E)")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise LoraConversionError(f"rank must be a positive integer, got {self.rank!r}")
        if self.max_error is not None and not (0.0 <= self.max_error < 1.0):
            raise LoraConversionError(f"max_error is a relative error in [0, 1), got {self.max_error!r}")
        if self.max_rank is not None:
            if self.rank is not None:
                raise LoraConversionError("max_rank caps the rank an error budget chooses; with rank it is not used")
            if not isinstance(self.max_rank, int) or self.max_rank < 1:
                raise LoraConversionError(f"max_rank must be a positive integer, got {self.max_rank!r}")
        if self.ranks is not None:
            if self.ranks not in SERVER_RANKS:
                raise LoraConversionError(f"ranks={self.ranks!r}: known servers are {sorted(SERVER_RANKS)}")
            allowed = SERVER_RANKS[self.ranks]
            if self.rank is not None and self.rank not in allowed:
                raise LoraConversionError(f"rank {self.rank} is not one of {self.ranks}'s ranks {list(allowed)}")
            if self.max_rank is not None and self.max_rank < min(allowed):
                raise LoraConversionError(f"max_rank {self.max_rank} is below every {self.ranks} rank {list(allowed)}")

    @property
    def allowed(self) -> tuple[int, ...] | None:
        return SERVER_RANKS[self.ranks] if self.ranks else None

    def choose(self, spectrum) -> RankChoice:
        return choose_rank(spectrum, self.rank, self.max_error, self.max_rank, self.allowed)


@dataclass(frozen=True)
class LayerConversion:
    """One layer's conversion: its module path, delta shape ``(out, width)``, rank and what the rank costs."""

    name: str
    shape: tuple[int, int]
    full_rank: int
    rank: int
    relative_error: float
    energy_kept: float
    budget_met: bool


@dataclass
class LoraReport:
    """Every layer's figures, whether the budget was met, and (from :func:`convert_to_lora`) the probe."""

    options: LoraOptions
    layers: list[LayerConversion] = field(default_factory=list)
    probe: dict | None = None
    source: str | None = None

    @property
    def failing(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.budget_met]

    @property
    def budget_met(self) -> bool:
        return not self.failing

    def as_dict(self) -> dict:
        errors = [layer.relative_error for layer in self.layers]
        return {
            "source": self.source,
            "options": asdict(self.options),
            "layers_converted": len(self.layers),
            "ranks": sorted({layer.rank for layer in self.layers}),
            "max_relative_error": max(errors, default=0.0),
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "min_energy_kept": min((layer.energy_kept for layer in self.layers), default=1.0),
            "lora_values": sum(layer.rank * sum(layer.shape) for layer in self.layers),
            "budget_met": self.budget_met,
            "over_budget": self.failing,
            "probe": self.probe,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def summary_lines(self) -> list[str]:
        """A short human-readable account (the CLI prints it to stderr; the JSON goes to stdout and the file)."""
        data = self.as_dict()
        lines = [
            f"{data['layers_converted']} layers, ranks {data['ranks']}, relative delta error max "
            f"{data['max_relative_error']:.3e} mean {data['mean_relative_error']:.3e}, energy kept >= "
            f"{data['min_energy_kept']:.6f}"
        ]
        if self.probe:
            lines.append(
                f"probe ({self.probe['tokens']} tokens): logit error {self.probe['logit_rel_err']:.3e}, KL(BOFT||LoRA) "
                f"mean {self.probe['kl_mean']:.3e} max {self.probe['kl_max']:.3e}; the adapter itself moves the base "
                f"by KL {self.probe['adapter_kl_mean']:.3e}"
            )
        if self.failing:
            lines.append(f"over budget ({len(self.failing)} layers): {', '.join(self.failing)}")
        return lines


def budget_error(report: LoraReport) -> LoraBudgetError:
    """The error raised (nothing written) when some layer's budget is missed; it carries ``report``."""
    over = [layer for layer in report.layers if not layer.budget_met]
    worst = ", ".join(f"{layer.name} ({layer.relative_error:.3e} at rank {layer.rank})" for layer in over[:8])
    more = f" and {len(over) - 8} more" if len(over) > 8 else ""
    cap = report.options.max_rank or (max(report.options.allowed) if report.options.allowed else None)
    return LoraBudgetError(
        f"no allowed rank{f' (<= {cap})' if cap else ''} meets max_error={report.options.max_error} for "
        f"{len(over)} of {len(report.layers)} layers: {worst}{more}; nothing was written. Allow a larger rank, a "
        "larger error, or ship the merged model",
        report,
    )
