"""Single-factor adapters: an m > 1 BOFT adapter rewritten as the exactly equivalent m = 1 adapter.

Stock PEFT without its CUDA extension (every CPU, many GPU setups) can only build one butterfly factor, so it cannot
load an m > 1 adapter. The composed rotation is block-diagonal with blocks of ``Be = b * 2**(m-1)``: one factor of
block size ``Be`` whose Cayley preimages ``boft_plugin.ops.single_factor`` computes in float64. The file then holds
``boft_R`` ``(1, N / 2**(m-1), Be, Be)`` (``N * b**2 * 2**(m-1)`` values instead of ``m * N * b**2``) and an
``adapter_config.json`` with ``boft_n_butterfly_factor: 1`` and ``boft_block_size: Be``; ``boft_s``, biases and
every other tensor and file are unchanged. See docs/single_factor.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..ops.single_factor import DEFAULT_ATOL, DEFAULT_MIN_DIST, BlockCheck, SingleFactorError, single_factor_blocks
from .layout import TOKENIZER_FILES
from .publish import ADAPTER_WEIGHTS, owns_directory, publish_export

__all__ = ["SingleFactorError", "convert_to_single_factor", "write_single_factor"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# what travels with a converted adapter besides its own two files: the model card and a tokenizer. Anything else in
# the source (a run's checkpoints, merged/, probes, logs) stays where it is.
COPIED_WITH_ADAPTER = frozenset({"README.md", *TOKENIZER_FILES})


def _single_factor_config(config: dict, factors: int, block_sizes: set[int], block_nums: set[int]) -> dict:
    """``adapter_config.json`` of the converted adapter (only BOFTConfig fields change)."""
    new = dict(config)
    per = 2 ** (factors - 1)
    if config.get("boft_block_size", 0):
        if block_sizes != {config["boft_block_size"]}:
            raise SingleFactorError(
                f"{CONFIG_NAME}: boft_block_size={config['boft_block_size']} but the tensors hold blocks of "
                f"{sorted(block_sizes)}"
            )
        new["boft_block_size"], new["boft_block_num"] = config["boft_block_size"] * per, 0
    else:
        if block_nums != {config["boft_block_num"]}:
            raise SingleFactorError(
                f"{CONFIG_NAME}: boft_block_num={config['boft_block_num']} but the tensors hold {sorted(block_nums)}"
            )
        new["boft_block_size"], new["boft_block_num"] = 0, config["boft_block_num"] // per
    new["boft_n_butterfly_factor"] = 1
    return new


def write_single_factor(
    source: Path, destination: Path, atol: float = DEFAULT_ATOL, min_dist: float = DEFAULT_MIN_DIST
) -> dict:
    """Write the single-factor form of the adapter files in ``source`` into the (empty, staging) ``destination``.

    Raises :class:`SingleFactorError` (naming the tensor and block) before anything is written when a block has no
    accurate m = 1 form. Returns a summary: factors, effective block size, layers, worst block, values before/after.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((source / CONFIG_NAME).read_text())
    if config.get("peft_type") != "BOFT":
        raise SingleFactorError(f"{source / CONFIG_NAME}: peft_type is {config.get('peft_type')!r}, not 'BOFT'")
    with safe_open(source / WEIGHTS_NAME, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iteration
    r_keys = sorted(k for k in tensors if k.endswith(".boft_R"))
    if not r_keys:
        raise SingleFactorError(f"{source / WEIGHTS_NAME}: no boft_R tensors")
    factors = {int(tensors[k].shape[0]) for k in r_keys}
    if len(factors) != 1:
        raise SingleFactorError(f"{source / WEIGHTS_NAME}: boft_R tensors disagree on m: {sorted(factors)}")
    m = factors.pop()
    m_config = config.get("boft_n_butterfly_factor", 1)
    if m != m_config and m != 1:
        raise SingleFactorError(f"{CONFIG_NAME} says boft_n_butterfly_factor={m_config}, the tensors hold {m}")
    converted, worst = dict(tensors), None
    if m == 1:  # already single-factor (perhaps a stock-PEFT CPU file whose config claims more): fix the config
        new_config = dict(config, boft_n_butterfly_factor=1)
    else:
        new_config = _single_factor_config(
            config, m, {int(tensors[k].shape[-1]) for k in r_keys}, {int(tensors[k].shape[1]) for k in r_keys}
        )
        checks = []
        for key in r_keys:
            blocks, check = single_factor_blocks(tensors[key], atol=atol, name=key, min_dist=min_dist)
            converted[key] = blocks.contiguous()
            checks.append(check)
        worst = BlockCheck(
            min_dist_to_minus_one=min(c.min_dist_to_minus_one for c in checks),
            max_abs_s=max(c.max_abs_s for c in checks),
            round_trip_f64=max(c.round_trip_f64 for c in checks),
            round_trip_f32=max(c.round_trip_f32 for c in checks),
        )
    copied, skipped = [], []
    for entry in sorted(source.iterdir()):
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if entry.name in COPIED_WITH_ADAPTER and entry.is_file() and not entry.is_symlink():
            shutil.copyfile(entry, destination / entry.name)
            copied.append(entry.name)
        else:
            skipped.append(entry.name)
    save_file(converted, str(destination / WEIGHTS_NAME), metadata=metadata)
    (destination / CONFIG_NAME).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
    return {
        "factors": m,
        "effective_block_size": None if m == 1 else sorted({int(converted[k].shape[-1]) for k in r_keys}),
        "layers": len(r_keys),
        "worst": None if worst is None else vars(worst),
        "values_before": sum(tensors[k].numel() for k in r_keys),
        "values_after": sum(converted[k].numel() for k in r_keys),
        "copied": copied,
        "not_copied": skipped,
    }


def convert_to_single_factor(
    source: str | os.PathLike,
    target: str | os.PathLike,
    atol: float = DEFAULT_ATOL,
    min_dist: float = DEFAULT_MIN_DIST,
    overwrite: bool = False,
) -> dict:
    """Convert the adapter directory ``source`` (ours or stock PEFT's) into its single-factor form in ``target``.

    Copies only the adapter, its model card and a tokenizer (:data:`COPIED_WITH_ADAPTER`; the summary lists what was
    left), and refuses symbolic links among them. Published as :mod:`.publish` says: a ``target`` holding only an
    earlier conversion is replaced whole; any other existing, non-empty ``target`` is refused unless ``overwrite``
    (then the adapter's files replace theirs and the rest is kept). Converting in place is refused.
    """
    source, target = Path(source), Path(target)
    if not (source / CONFIG_NAME).is_file() or not (source / WEIGHTS_NAME).is_file():
        raise SingleFactorError(f"{source}: not an adapter directory ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    links = [
        e.name
        for e in source.iterdir()
        if e.is_symlink() and e.name in COPIED_WITH_ADAPTER | {CONFIG_NAME, WEIGHTS_NAME}
    ]
    if links:
        raise SingleFactorError(
            f"{source}: {', '.join(sorted(links))} is a symbolic link; convert from a directory of regular files "
            "(copy the files the links point to first)"
        )
    if target.exists() and source.resolve() == target.resolve():
        raise SingleFactorError(f"{target}: convert into another directory, the source adapter is kept as it is")
    owned = owns_directory(target, "single_factor_adapter")
    if not owned and not overwrite:
        raise SingleFactorError(f"{target} exists and is not empty; choose a new directory or pass overwrite")
    with publish_export(target, "single_factor_adapter", ADAPTER_WEIGHTS) as staging:
        return write_single_factor(source, staging, atol=atol, min_dist=min_dist)
