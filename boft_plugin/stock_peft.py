"""Run stock PEFT's own BOFT (the oracle), including its m > 1 path on machines without its CUDA extension.

PEFT builds its m > 1 block-diagonal with a CUDA extension (``fbd_cuda``); where that cannot build it warns and
silently uses one butterfly factor. For comparisons (tests, benchmarks, reload checks of exported adapters)
:func:`stock_peft_boft` makes PEFT believe the extension loaded and replaces its block-diagonal with
``torch.block_diag`` per factor, so PEFT's real dense m-factor maths runs anywhere (docs/design.md, "Oracle").
It also routes ``BOFT`` to PEFT's tuner for the duration. Not for training: it is PEFT's slow dense path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .tuner.registry import _mapping


def _block_diag_per_factor(blocks: torch.Tensor) -> torch.Tensor:
    """``(m, N, b, b)`` -> ``(m, N*b, N*b)``: the CPU stand-in for PEFT's ``FastBlockDiag``."""
    return torch.stack([torch.block_diag(*factor) for factor in blocks])


@contextmanager
def stock_peft_boft(multi_factor: bool = True) -> Iterator[None]:
    """Within this context PEFT's own ``BOFTModel`` builds BOFT adapters.

    Args:
        multi_factor: patch PEFT so that it keeps ``boft_n_butterfly_factor > 1`` without its CUDA extension.
            With ``False`` PEFT behaves as shipped on a machine where the extension does not build (one factor
            whatever the config says), without attempting the build.

    Build *and run* the stock model inside the context: PEFT looks the extension up again in every forward.
    """
    from peft.tuners.boft import layer as peft_boft_layer
    from peft.tuners.boft.model import BOFTModel
    from peft.utils import PeftType

    mapping = _mapping()
    previous_tuner = mapping[PeftType.BOFT]
    previous_fbd = peft_boft_layer._FBD_CUDA
    previous_apply = vars(peft_boft_layer.FastBlockDiag).get("apply")  # None: inherited from autograd.Function
    mapping[PeftType.BOFT] = BOFTModel
    # get_fbd_cuda() returns any non-None cached value as is: a falsy one gives PEFT's one-factor fallback without
    # the (slow, CC/CXX-changing) compile attempt it would otherwise repeat for every layer.
    peft_boft_layer._FBD_CUDA = object() if multi_factor else False
    if multi_factor:
        peft_boft_layer.FastBlockDiag.apply = staticmethod(_block_diag_per_factor)
    try:
        yield
    finally:
        mapping[PeftType.BOFT] = previous_tuner
        peft_boft_layer._FBD_CUDA = previous_fbd
        if multi_factor:
            if previous_apply is None:
                del peft_boft_layer.FastBlockDiag.apply
            else:
                peft_boft_layer.FastBlockDiag.apply = previous_apply


@contextmanager
def stock_peft_as_installed() -> Iterator[None]:
    """Within this context PEFT's own ``BOFTModel`` builds BOFT adapters exactly as shipped: nothing patched, so on
    a CUDA machine PEFT tries to build ``fbd_cuda`` itself and falls back to one factor when that fails."""
    from peft.tuners.boft.model import BOFTModel
    from peft.utils import PeftType

    mapping = _mapping()
    previous_tuner = mapping[PeftType.BOFT]
    mapping[PeftType.BOFT] = BOFTModel
    try:
        yield
    finally:
        mapping[PeftType.BOFT] = previous_tuner
