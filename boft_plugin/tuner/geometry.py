"""Block geometry of one adapted layer: resolution from a BOFT config, and the rules PEFT enforces.

This module is the one place that decides BOFT geometry: the model-level validation (``targets.plan_targets``)
collects every offending module before any layer is replaced, the layer uses the same resolution when it creates
its parameters, the recipe checks call :func:`check_block_config` on the keys alone, and the benchmarks size their
cases with it. Vocabulary (docs/design.md, "Blocks"): *factor blocks* are the ``b x b`` blocks of ``boft_R``;
*effective blocks* (``Be = b * 2**(m-1)``) are the dense diagonal blocks of the composed rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GeometryError
from ..ops.butterfly import effective_block_size

__all__ = [
    "Geometry",
    "GeometryError",
    "check_block_config",
    "resolve_geometry",
    "scale_shape",
    "suggest_valid_choices",
]


@dataclass(frozen=True)
class Geometry:
    """Resolved geometry: ``width = block_num * block_size``; ``n_factors`` butterfly factors."""

    width: int
    block_size: int
    block_num: int
    n_factors: int

    @property
    def effective_block_size(self) -> int:
        """Size ``b * 2**(m-1)`` of the dense diagonal blocks of the composed rotation."""
        return effective_block_size(self.block_size, self.n_factors)

    @property
    def effective_block_num(self) -> int:
        """Number ``N / 2**(m-1)`` of effective blocks (the unit that is partitioned across ranks)."""
        return self.block_num // 2 ** (self.n_factors - 1)

    @property
    def param_shape(self) -> tuple[int, int, int, int]:
        """Shape ``(m, N, b, b)`` of ``boft_R``."""
        return (self.n_factors, self.block_num, self.block_size, self.block_size)


def check_block_config(block_size: int, block_num: int, n_factors: int) -> None:
    """The rules that hold whatever the layer width: exactly one of size/count, positive integers, and for
    ``m > 1`` an even block size and a block count that is a multiple of ``2**(m-1)``.

    Raises:
        GeometryError: with a one-sentence reason.
    """
    if not isinstance(n_factors, int) or isinstance(n_factors, bool) or n_factors < 1:
        raise GeometryError(
            f"boft_n_butterfly_factor must be a positive integer, got {n_factors!r}", "boft_n_butterfly_factor"
        )
    for name, value in (("boft_block_size", block_size), ("boft_block_num", block_num)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise GeometryError(f"{name} must be a non-negative integer, got {value!r}", name)
    if (block_size != 0) == (block_num != 0):
        raise GeometryError(
            "set exactly one of boft_block_size and boft_block_num to a positive value "
            f"(got boft_block_size={block_size}, boft_block_num={block_num})"
        )
    group = 2 ** (n_factors - 1)
    if n_factors > 1 and block_size % 2:
        raise GeometryError(
            f"boft_block_size={block_size} must be even when boft_n_butterfly_factor={n_factors} > 1", "boft_block_size"
        )
    if block_num % group:
        raise GeometryError(
            f"boft_block_num={block_num} must be a multiple of 2**(m-1)={group} for "
            f"boft_n_butterfly_factor={n_factors}",
            "boft_block_num",
        )


def resolve_geometry(width: int, block_size: int, block_num: int, n_factors: int) -> Geometry:
    """Resolve ``(block_size, block_num)`` for a layer of input width ``width`` with PEFT's rules.

    Exactly one of ``block_size`` / ``block_num`` is non-zero. With ``m > 1`` the width must split into
    ``2**(m-1)``-block butterfly groups and both the block size and the block count must be even.

    Raises:
        GeometryError: with a one-sentence reason (no layer name: the caller adds it).
    """
    check_block_config(block_size, block_num, n_factors)
    group = 2 ** (n_factors - 1)
    if block_num:
        if width % block_num:
            raise GeometryError(f"width {width} is not divisible by boft_block_num={block_num}")
        block_size = width // block_num
    else:
        if width % block_size:
            raise GeometryError(f"width {width} is not divisible by boft_block_size={block_size}")
        if width % (block_size * group):
            raise GeometryError(
                f"width {width} is not divisible by boft_block_size*2**(m-1)={block_size * group} "
                f"(the effective block size for boft_n_butterfly_factor={n_factors})"
            )
        block_num = width // block_size
    if n_factors > 1 and block_size % 2:
        raise GeometryError(f"block size {block_size} must be even when boft_n_butterfly_factor > 1")
    if n_factors > 1 and block_num % 2:
        raise GeometryError(f"block count {block_num} must be even when boft_n_butterfly_factor > 1")
    return Geometry(width=width, block_size=block_size, block_num=block_num, n_factors=n_factors)


def scale_shape(kind: str, out_features: int) -> tuple[int, int]:
    """Shape of ``boft_s`` as PEFT stores it: ``(1, out)`` for Conv2d, ``(out, 1)`` for linear layers."""
    return (1, out_features) if kind == "conv2d" else (out_features, 1)


def _is_valid(width: int, block_size: int, block_num: int, n_factors: int) -> bool:
    try:
        resolve_geometry(width, block_size, block_num, n_factors)
    except GeometryError:
        return False
    return True


def suggest_valid_choices(width: int, block_size: int, block_num: int, n_factors: int, limit: int = 8) -> str:
    """Human-readable valid alternatives for this width (same mode as the config, same m; then the best m)."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    by_count = bool(block_num)
    key = "boft_block_num" if by_count else "boft_block_size"
    if n_factors >= 1:
        if by_count:
            valid = [d for d in divisors if _is_valid(width, 0, d, n_factors)]
        else:
            valid = [d for d in divisors if _is_valid(width, d, 0, n_factors)]
    else:
        valid = []
    parts = []
    if valid:
        shown = ", ".join(str(v) for v in valid[:limit]) + (", ..." if len(valid) > limit else "")
        parts.append(f"valid {key} for width {width} with boft_n_butterfly_factor={n_factors}: {shown}")
    else:
        parts.append(f"no {key} works for width {width} with boft_n_butterfly_factor={n_factors}")
    current = block_num if by_count else block_size
    if current > 0:
        best = [m for m in range(1, 17) if _is_valid(width, 0 if by_count else current, current if by_count else 0, m)]
        if best:
            parts.append(f"with {key}={current} boft_n_butterfly_factor may be at most {max(best)}")
    return "; ".join(parts)
