"""Safetensors files written one tensor at a time, laid out exactly as ``save_pretrained`` lays them out.

The shard plan is made up front from the tensors' global shapes and dtypes (known without gathering: ``ds_shape``
under ZeRO-3, the global shape of a DTensor), so each shard's safetensors header is written first and every tensor's
bytes go to their planned offset as they arrive: a writer never holds more than one tensor. Shards are split as
``huggingface_hub.split_torch_state_dict_into_shards`` splits them; inside a file tensors are laid out in
safetensors' own order (dtype descending, then name), so with an identity adapter the files are byte-identical to
``save_pretrained(max_shard_size=...)``'s (tested).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "ShardPlan",
    "ShardWriter",
    "TensorEntry",
    "global_shape",
    "plan_shards",
    "save_configs",
    "tied_keys",
]

DEFAULT_MAX_SHARD_SIZE = "1GB"  # rank 0 memory does not depend on it (tensors are streamed into the file)

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


# safetensors' Dtype enum order (its serializer sorts tensors by dtype, descending, then by name)
_DTYPE_ORDER = [
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
]


def global_shape(tensor: Tensor) -> tuple[int, ...]:
    if hasattr(tensor, "ds_shape"):  # ZeRO-3 partitioned parameter
        return tuple(tensor.ds_shape)
    return tuple(tensor.shape)  # DTensor: the global shape


@dataclass
class TensorEntry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: str = ""
    begin: int = 0  # byte offset inside the file's data section


@dataclass
class ShardPlan:
    entries: list[TensorEntry]
    files: list[str]
    total_size: int


def plan_shards(entries: list[TensorEntry], max_shard_size: int | str) -> ShardPlan:
    """Greedy split in model order, exactly as ``huggingface_hub.split_torch_state_dict_into_shards``."""
    from ..runtime.upstream import parse_size_to_int

    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    shards: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    size = 0
    for entry in entries:
        if entry.nbytes > limit:
            shards.append([entry])
            continue
        if size + entry.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        offset = 0  # data laid out as safetensors' own serializer does: dtype (descending), then name
        for entry in sorted(shard, key=lambda e: (-_DTYPE_ORDER.index(_DTYPES[e.dtype]), e.key)):
            entry.file, entry.begin = name, offset
            offset += entry.nbytes
    return ShardPlan(entries=entries, files=names, total_size=sum(e.nbytes for e in entries))


def _header(entries: list[TensorEntry]) -> bytes:
    """The safetensors header (8-byte little-endian length + JSON, space-padded to 8 bytes)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    for e in sorted(entries, key=lambda e: e.begin):
        meta[e.key] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.begin + e.nbytes]}
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Writes each tensor at its planned offset in its shard file (one file open at a time).

    Tensors arrive in model order; inside a file they are laid out in safetensors' canonical order, so the files are
    byte-identical to ``save_pretrained``'s.
    """

    def __init__(self, root: Path, plan: ShardPlan):
        self.root, self.plan = root, plan
        self.by_file: dict[str, list[TensorEntry]] = {}
        for e in plan.entries:
            self.by_file.setdefault(e.file, []).append(e)
        self.handle = None
        self.file = None
        self.data_start = 0
        self.pending: set[str] = set()

    def write(self, entry: TensorEntry, value: Tensor) -> None:
        if entry.file != self.file:
            self.close()
            self.file = entry.file
            self.handle = open(self.root / entry.file, "wb")  # noqa: SIM115 - closed in close(), kept across writes
            header = _header(self.by_file[entry.file])
            self.handle.write(header)
            self.data_start = len(header)
            self.pending = {e.key for e in self.by_file[entry.file]}
        if tuple(value.shape) != entry.shape or value.dtype != entry.dtype:
            raise RuntimeError(
                f"{entry.key}: got {tuple(value.shape)} {value.dtype}, planned {entry.shape} {entry.dtype}"
            )
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.seek(self.data_start + entry.begin)
        self.handle.write(memoryview(data))
        self.pending.discard(entry.key)

    def close(self, require_complete: bool = True) -> None:
        if self.handle is None:
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        if self.pending and require_complete:
            raise RuntimeError(f"{self.file}: tensors never written: {sorted(self.pending)[:5]}")


def tied_keys(base_model: nn.Module) -> set[str]:
    keys = getattr(base_model, "all_tied_weights_keys", None)
    if keys:
        return set(keys)
    tied = set()
    for name, module in base_model.named_modules():
        for key in getattr(module, "_tied_weights_keys", None) or ():
            tied.add(f"{name}.{key}" if name else key)
    return tied


def save_configs(base_model: nn.Module, directory: Path, dtype: torch.dtype | None = None) -> None:
    """``config.json`` (+ ``generation_config.json``) as ``save_pretrained`` writes them for the plain model.

    ``dtype``: the weights' dtype (default: the first floating parameter's); a ``quantization_config`` is dropped
    (the exported weights are plain).
    """
    import copy

    config = copy.deepcopy(base_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        dtype = next((p.dtype for p in base_model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(base_model).__name__.removeprefix("FSDP")]
    config.save_pretrained(str(directory))
    generation = getattr(base_model, "generation_config", None)
    can_generate = getattr(base_model, "can_generate", lambda: False)()
    if generation is not None and can_generate:
        generation.save_pretrained(str(directory))
