"""Shared behaviour of our BOFT layers: parameters, rotation blocks, merge/unmerge.

The layer classes subclass PEFT's ``BOFTLayer`` so that PEFT's helpers (``set_adapter``, ``delete_adapter``,
``disable_adapter``, ``merge_and_unload``, state-dict helpers) and TRL treat them as BOFT layers. Nothing here
calls PEFT's ``BOFTLayer.update_layer``: that would try to compile PEFT's CUDA extension and, where it cannot,
silently drop to one butterfly factor.

Subclasses say how their base weight maps to an ``(out, width)`` matrix and how ``boft_s`` is laid out.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.boft.layer import BOFTLayer, MultiplicativeDropoutLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from ..ops.butterfly import rotate_weight
from ..ops.scale_shift import SMALL_SCALE
from .geometry import Geometry, GeometryError, resolve_geometry, scale_shape
from .quantised import check_mergeable, dequantised_weight
from .rotation import BlockCache, application_blocks, effective_blocks_from, min_application_width
from .zero3 import zero3_pre_forward_hook


@torch.no_grad()
def merge_matrix(matrix: Tensor, boft_r: Tensor, boft_s: Tensor, inverse: bool = False) -> Tensor:
    """Merge (``W B^T``, rows scaled by ``boft_s``) or unmerge one adapter into an ``(out, width)`` matrix.

    Args:
        matrix: ``(out, width)`` base weight; boft_r: ``(m, N, b, b)``; boft_s: ``(out, 1)`` or ``(1, out)``.

    Returns:
        ``(out, width)`` in float32 (float64 stays float64).
    """
    blocks = effective_blocks_from(boft_r)
    scale = boft_s.reshape(-1, 1).to(blocks.dtype)
    if inverse:
        return rotate_weight(matrix.to(blocks.dtype) / scale, blocks, inverse=True)
    return rotate_weight(matrix, blocks) * scale


def _is_sharded(param: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")


class BoftLayer(BOFTLayer):
    """Parameters and maths common to every layer type; see :class:`BoftLinear` and :class:`BoftConv2d`."""

    # `boft_geometry` is a plain dict (not a buffer): it survives meta-device init, `to_empty()` and ZeRO-3
    # partitioning, where the parameter shapes do not tell the geometry. `boft_block_major` marks adapters whose
    # boft_R is stored transposed as (N, m, b, b) so that FSDP2 can shard the block axis as its dim 0.
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout", "boft_geometry", "boft_block_major")

    def _init_boft_state(self) -> None:
        self.boft_geometry: dict[str, Geometry] = {}
        self.boft_block_major: dict[str, bool] = {}
        self._boft_block_cache = BlockCache()
        # adapter -> every |boft_s| >= SMALL_SCALE, and boft_s._version then (None: sharded); set by the numerics
        # guard. Two dicts: a compiled forward reads (and guards on) the first only, so new versions do not recompile.
        self._boft_scale_large: dict[str, bool] = {}
        self._boft_scale_version: dict[str, int | None] = {}
        self.register_forward_pre_hook(zero3_pre_forward_hook)

    # -- subclass hooks ---------------------------------------------------------------------------------------
    def rotated_width(self) -> int:
        """Width of the vector the butterfly rotation acts on (``in_features`` for a linear layer)."""
        raise NotImplementedError

    kind = "linear"  # "linear" or "conv2d": decides the layout of boft_s (geometry.scale_shape)

    def _scale_shape(self) -> tuple[int, int]:
        """Shape of ``boft_s`` (PEFT: ``(out, 1)`` for linear layers, ``(1, out)`` for Conv2d)."""
        return scale_shape(self.kind, self.out_features)

    def adapter_shapes(self, adapter_name: str) -> dict[str, tuple[int, ...]]:
        """Shapes of ``boft_R`` (PEFT's layout) and ``boft_s`` of ``adapter_name`` as written to a checkpoint."""
        return {"boft_R": self.boft_geometry[adapter_name].param_shape, "boft_s": self._scale_shape()}

    def weight_to_matrix(self, weight: Tensor) -> Tensor:
        """A base weight (this layer's layout) as an ``(out, width)`` matrix view."""
        raise NotImplementedError

    def matrix_to_weight(self, matrix: Tensor, weight_shape: torch.Size) -> Tensor:
        """Inverse of :meth:`weight_to_matrix`."""
        raise NotImplementedError

    def get_base_weight(self) -> Tensor:
        """The base weight as a float tensor (PEFT's method; a bitsandbytes 4-bit weight that its CPU forward
        repacked is unpacked first, which PEFT's own backend would misread)."""
        return dequantised_weight(self)

    def _weight_matrix(self) -> tuple[Tensor, torch.Size, torch.dtype]:
        """The base weight as an ``(out, width)`` matrix (dequantised once for a quantised base), its shape and
        dtype."""
        weight = dequantised_weight(self)
        return self.weight_to_matrix(weight), weight.shape, weight.dtype

    def _store_weight_matrix(self, matrix: Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        """Write an ``(out, width)`` matrix back as the base weight (re-quantised by the layer's backend)."""
        self.set_base_weight(self.matrix_to_weight(matrix, shape).contiguous().to(dtype))

    # -- adapter creation -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        """Create adapter ``adapter_name``: ``boft_R`` ``(m, N, b, b)`` and ``boft_s`` from ``config``.

        The butterfly factor count is taken from the config as is; a geometry that cannot work raises.
        """
        try:
            geometry = resolve_geometry(
                self.rotated_width(), config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
            )
        except GeometryError as err:
            raise ValueError(f"BOFT adapter '{adapter_name}' cannot be added to this layer: {err.reason}") from None

        dropout = MultiplicativeDropoutLayer(p=config.boft_dropout) if config.boft_dropout > 0 else nn.Identity()
        self.boft_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        self.boft_R[adapter_name] = nn.Parameter(torch.zeros(geometry.param_shape))
        self.boft_s[adapter_name] = nn.Parameter(torch.ones(self._scale_shape()))
        self.reset_boft_parameters(adapter_name, config.init_weights)
        self.boft_block_size[adapter_name] = geometry.block_size
        self.boft_block_num[adapter_name] = geometry.block_num
        self.boft_geometry[adapter_name] = geometry
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        scale = self.boft_s[adapter_name]
        if not scale.is_meta:  # at creation, not in the hot path: one read of the initial scale
            self.set_scale_hint(adapter_name, bool((scale.detach().abs() >= SMALL_SCALE).all()))

    # -- maths ------------------------------------------------------------------------------------------------
    def active_boft_adapters(self) -> list[str]:
        """Active adapters that live on this layer, in PEFT's order."""
        return [name for name in self.active_adapters if name in self.boft_R]

    def adapters_to_apply(self) -> list[str]:
        """Adapters a forward applies on top of the base layer: none when adapters are disabled (merged ones are
        unmerged first, as PEFT does) or already merged into the weight."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        return [] if self.merged else self.active_boft_adapters()

    def boft_R_peft_layout(self, adapter_name: str) -> Tensor:
        """``boft_R`` of ``adapter_name`` in PEFT's ``(m, N, b, b)`` layout (a view if stored block-major)."""
        weight = self.boft_R[adapter_name]
        return weight.transpose(0, 1) if self.boft_block_major.get(adapter_name) else weight

    def to_peft_layout(self, adapter_name: str, full: Tensor) -> Tensor:
        """A gathered full ``boft_R`` of ``adapter_name`` in PEFT's ``(m, N, b, b)`` layout."""
        return full.transpose(0, 1).contiguous() if self.boft_block_major.get(adapter_name) else full

    @torch.no_grad()
    def store_block_major(self, adapter_name: str) -> None:
        """Store ``boft_R`` as ``(N, m, b, b)``: the block axis first, for sharding on dim 0 (FSDP2).

        The checkpoint layout does not change: every export transposes back to PEFT's ``(m, N, b, b)``.
        """
        if self.boft_block_major.get(adapter_name):
            return
        old = self.boft_R[adapter_name]
        self.boft_R[adapter_name] = nn.Parameter(old.transpose(0, 1).contiguous(), requires_grad=old.requires_grad)
        self.boft_block_major[adapter_name] = True

    def _dropout_p(self, adapter_name: str) -> float:
        dropout = self.boft_dropout[adapter_name]
        return dropout.p if isinstance(dropout, MultiplicativeDropoutLayer) and dropout.training else 0.0

    def effective_blocks(self, adapter_name: str) -> Tensor:
        """Effective blocks ``(K, Be, Be)`` of adapter ``adapter_name``'s rotation, float32 (float64 stays).

        Applies ``boft_dropout`` in training, like PEFT's ``MultiplicativeDropoutLayer``.
        """
        return effective_blocks_from(self.boft_R_peft_layout(adapter_name), self._dropout_p(adapter_name))

    def application_blocks(self, adapter_name: str, dtype: torch.dtype, tokens: int | None = None) -> Tensor:
        """Blocks ``(K', A, A)`` in ``dtype`` that multiply the activations (see :mod:`.rotation`)."""
        boft_r = self.boft_R_peft_layout(adapter_name)
        p = self._dropout_p(adapter_name)
        width = min_application_width(boft_r.device)

        def build() -> Tensor:
            return application_blocks(boft_r, p, width, tokens).to(dtype)

        if BlockCache.usable(boft_r, p):
            return self._boft_block_cache.get(adapter_name, boft_r, dtype, width, build)
        # a forward that may be followed by an optimizer step: fused optimizers update parameters without
        # bumping their version counter, so nothing cached before this point may be trusted afterwards
        self._boft_block_cache.clear()
        return build()

    def train(self, mode: bool = True):
        """``nn.Module.train`` that also drops cached blocks (a mode switch starts or ends an unchanged phase).

        Subclasses list ``nn.Module`` first (as PEFT's layers do), so they bind this explicitly.
        """
        self._boft_block_cache.clear()
        return nn.Module.train(self, mode)

    def set_scale_hint(self, adapter_name: str, all_large: bool) -> None:
        """Record whether every ``|boft_s| >= SMALL_SCALE`` (the numerics guard's finding, or the initial value).

        Tied to the parameter's version where the forward sees the same tensor, so an in-place change of
        ``boft_s`` (a load, a manual edit) voids it; sharded parameters are re-checked after every step instead.
        """
        param = self.boft_s[adapter_name]
        if self._boft_scale_large.get(adapter_name) != all_large:  # unchanged: nothing a compiled graph guards on
            self._boft_scale_large[adapter_name] = all_large
        self._boft_scale_version[adapter_name] = None if _is_sharded(param) else param._version

    def scale_is_large(self, adapters: list[str]) -> bool:
        """Whether backward may recover ``r - b`` from the output (:func:`..ops.scale_shift.scale_shift`)."""
        if len(adapters) != 1:
            return False
        all_large = self._boft_scale_large.get(adapters[0], False)
        if not all_large or torch.compiler.is_compiling():  # compiled: the guard's refresh after each step holds
            return all_large
        version = self._boft_scale_version.get(adapters[0])
        return version is None or version == self.boft_s[adapters[0]]._version

    def scale_vector(self, adapter_name: str) -> Tensor:
        """``boft_s`` of ``adapter_name`` as an ``(out,)`` vector."""
        return self.boft_s[adapter_name].reshape(-1)

    def get_delta_weight(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        """PEFT-compatible ``(rotation, boft_s)``; the rotation is a dense ``(width, width)`` matrix.

        For inspection and PEFT helpers only: training, merge and export never build it.
        """
        blocks = effective_blocks_from(self.boft_R_peft_layout(adapter_name))  # deterministic: no dropout, as in PEFT
        scale = self.boft_s[adapter_name]
        return torch.block_diag(*blocks), scale if scale.shape[1] == 1 else scale.transpose(0, 1)

    def _merged_matrix(self, matrix: Tensor, adapter_name: str) -> Tensor:
        return merge_matrix(matrix, self.boft_R_peft_layout(adapter_name), self.boft_s[adapter_name])

    def _unmerged_matrix(self, matrix: Tensor, adapter_name: str) -> Tensor:
        return merge_matrix(matrix, self.boft_R_peft_layout(adapter_name), self.boft_s[adapter_name], inverse=True)

    # -- merge / unmerge (PEFT's API) -------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the base weight: ``W' = (B @ W^T)^T * boft_s``, one adapter after another.

        The weight is read once, every adapter is applied in float32 and the result written once: on a quantised
        base that is one dequantisation and one re-quantisation with the layer's own settings, whatever the number
        of adapters. With ``safe_merge`` the merged weight is checked for NaN/Inf before anything is written.
        """
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.boft_R]
        if not adapter_names:
            return
        check_mergeable(self, "merge")
        merged, shape, dtype = self._weight_matrix()
        for name in adapter_names:
            merged = self._merged_matrix(merged, name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self._store_weight_matrix(merged, shape, dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        lost = [n for n in self.merged_adapters if n in self.boft_s and bool((self.boft_s[n] == 0).any())]
        if lost:  # PEFT divides by boft_s here and writes NaN rows
            raise ValueError(
                f"cannot unmerge BOFT adapter(s) {lost} of layer {getattr(self, 'boft_module_name', '?')}: boft_s is "
                "0 for some outputs, so those rows of the merged weight are 0 and the base weight cannot be "
                "recovered; the layer stays merged"
            )
        check_mergeable(self, "unmerge")
        if self.quantization_backend is not None:
            warnings.warn(
                "unmerging BOFT adapters from a quantised base layer re-quantises its weight: the base is then "
                "within one quantisation step of the original, not equal to it (merge only to export or serve)",
                stacklevel=2,
            )
        matrix, shape, dtype = self._weight_matrix()
        for name in reversed(self.merged_adapters):
            if name in self.boft_R:
                matrix = self._unmerged_matrix(matrix, name)
        self._store_weight_matrix(matrix, shape, dtype)
        self.merged_adapters.clear()
