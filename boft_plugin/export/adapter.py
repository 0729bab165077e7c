"""Gathered export of PEFT adapters from any layout (single process, DDP, DeepSpeed ZeRO-1/2/3, FSDP2).

Collective: every rank calls :func:`export_adapter`. Rank 0 first opens its staging directory and every rank agrees
it could (a failure there raises on every rank before any gather); adapter tensors are then gathered one at a time,
rank 0 writes and publishes (:mod:`.publish`), and every rank raises if that failed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from ..distributed.gather import full_tensor, settle_zero3, unwrap_peft_model
from ..runtime.ranks import raise_if_any_rank_failed, rank
from ..tuner.state_dict import unchecked_selection
from .publish import ADAPTER_WEIGHTS, publish_export

__all__ = ["export_adapter"]


def _adapter_tensors(peft_model, adapter_name: str) -> dict[str, Tensor]:
    """{model state-dict key: parameter or buffer object} of what PEFT saves for ``adapter_name``."""
    from peft.utils import get_peft_model_state_dict

    live = peft_model.state_dict(keep_vars=True)
    key_of = {id(value): key for key, value in live.items()}
    with unchecked_selection():  # still partitioned here: gathered (and laid out) by the caller
        selected = get_peft_model_state_dict(peft_model, state_dict=live, adapter_name=adapter_name)
    return {key_of[id(value)]: value for value in selected.values()}


def export_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    adapter_names: list[str] | None = None,
    single_factor: bool = False,
    extra_files: Callable[[Path], None] | None = None,
) -> Path | None:
    """Write the PEFT adapter(s) of ``model`` to ``output_dir`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, ``peft_type: BOFT``), gathered from whatever layout ``model`` is in.

    Collective: call on every rank. Returns the directory on rank 0, None elsewhere. Published as
    :mod:`.publish` says: a directory holding only an earlier export is replaced whole; into a directory shared with
    other files (a run's ``output_dir``) each file is replaced atomically, an ``adapter_model.bin`` the new
    safetensors file supersedes is removed, and checkpoints, logs and other files are left alone.

    Args:
        model: a ``PeftModel``, possibly wrapped (DDP, DeepSpeed engine, accelerate, FSDP2 ``fully_shard``).
        adapter_names: adapters to write (default: all, laid out as PEFT's ``save_pretrained`` does).
        single_factor: write each adapter in its exactly equivalent single-factor form (``boft_n_butterfly_factor:
            1``, ``boft_block_size: b * 2**(m-1)``), which stock PEFT loads without its CUDA extension
            (:mod:`boft_plugin.export.single_factor`). Raises ``SingleFactorError`` naming the layer, and writes
            nothing, when a block has no accurate single-factor form.
        extra_files: called with the staging directory to add files published with the adapter (a tokenizer).
    """
    settle_zero3(model)
    peft_model = unwrap_peft_model(model)
    names = list(peft_model.peft_config) if adapter_names is None else list(adapter_names)
    kind = "single_factor_adapter" if single_factor else "adapter"
    with contextlib.ExitStack() as stack:
        staging, error = None, None
        if rank() == 0:  # pre-flight: the staging directory exists (target filesystem, writable) before any gather
            try:
                staging = stack.enter_context(publish_export(output_dir, kind, ADAPTER_WEIGHTS))
            except Exception as err:  # noqa: BLE001 - agreed on by every rank below, so none hangs
                error = err
        raise_if_any_rank_failed(error)
        gathered: dict[str, Tensor] = {}
        for name in names:
            for key, tensor in sorted(_adapter_tensors(peft_model, name).items()):
                if key not in gathered:  # the layout of block-major (FSDP2) tensors is restored by the tuner on save
                    value = full_tensor(tensor)
                    gathered[key] = value.to("cpu", copy=True) if rank() == 0 else value
        if staging is not None:
            try:
                if single_factor:
                    _save_single_factor(peft_model, staging, names, gathered)
                else:
                    peft_model.save_pretrained(str(staging), selected_adapters=names, state_dict=gathered)
                if extra_files is not None:
                    extra_files(staging)
                stack.close()  # publish
            except Exception as err:  # noqa: BLE001
                error = err  # the ExitStack removes the staging directory without publishing (exit with error)
                stack.__exit__(type(err), err, err.__traceback__)
    raise_if_any_rank_failed(error)
    return Path(output_dir) if rank() == 0 else None


def _save_single_factor(peft_model, staging: Path, names: list[str], gathered: dict[str, Tensor]) -> None:
    """PEFT's own save into a scratch directory, then each adapter rewritten in single-factor form into ``staging``."""
    import tempfile

    from .single_factor import write_single_factor

    with tempfile.TemporaryDirectory(dir=staging, prefix=".single-factor-") as scratch:  # gone before the publish
        peft_model.save_pretrained(scratch, selected_adapters=names, state_dict=gathered)
        for config in sorted(Path(scratch).rglob("adapter_config.json")):
            relative = config.parent.relative_to(scratch)
            (staging / relative).mkdir(parents=True, exist_ok=True)
            write_single_factor(config.parent, staging / relative)
