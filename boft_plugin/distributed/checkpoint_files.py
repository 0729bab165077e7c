"""Reading a Hugging Face safetensors checkpoint one tensor (or one slice of a tensor) at a time.

Shared by the FSDP2 loader (:mod:`.fsdp2.loading`) and the ZeRO-3 loader (:mod:`.zero.loading`). Nothing here holds
more than one tensor slice at a time; files are opened one at a time (``safe_open`` memory-maps a file; its pages
count as ``RssFile`` while open and are released on close).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointIndex",
    "KeyMatch",
    "base_checkpoint_key",
    "has_safetensors",
    "match_checkpoint_keys",
    "names_by_tensor",
    "read_flat_range",
    "read_slice",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def has_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local checkpoint directory with safetensors weights (readable slice by slice)."""
    return os.path.isfile(os.path.join(path, SAFE_WEIGHTS_NAME)) or os.path.isfile(
        os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    )


def _shard_file(root: Path, name: object, index: Path) -> str:
    """An index's shard name as a path inside ``root``; refuses names that would leave the checkpoint directory."""
    if (
        not isinstance(name, str)
        or not name
        or name != os.path.basename(name)
        or name in (".", "..")
        or "\\" in name
        or os.path.isabs(name)
    ):
        raise ValueError(
            f"{index}: shard name {name!r} is not a plain file name in {root}; the index of a checkpoint names files"
            " next to it only"
        )
    return str(root / name)


class CheckpointIndex:
    """``{checkpoint key: file}`` of a safetensors checkpoint directory (sharded with an index, or one file).

    Read in the order transformers' ``from_pretrained`` reads it: a single ``model.safetensors`` wins over an index,
    so that every loader sees the same model in a directory that holds both (another tool's re-export).
    """

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.root = Path(checkpoint_dir)
        index = self.root / SAFE_WEIGHTS_INDEX_NAME
        single = self.root / SAFE_WEIGHTS_NAME
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                self.key_to_file = dict.fromkeys(handle.keys(), str(single))
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.key_to_file = {key: _shard_file(self.root, name, index) for key, name in weight_map.items()}
        else:
            raise FileNotFoundError(
                f"{self.root} holds neither {SAFE_WEIGHTS_INDEX_NAME} nor {SAFE_WEIGHTS_NAME} (only safetensors "
                "checkpoints can be read slice by slice)"
            )

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def resolve(self, candidates: Iterable[str], prefix: str | None = None) -> str | None:
        """The first candidate key present in the checkpoint, also trying with/without ``prefix.`` (e.g. ``model``)."""
        for key in candidates:
            if key in self.key_to_file:
                return key
            if prefix:
                if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in self.key_to_file:
                    return key[len(prefix) + 1 :]
                if f"{prefix}.{key}" in self.key_to_file:
                    return f"{prefix}.{key}"
        return None

    def group_by_file(self, keys: Iterable[tuple[str, object]]) -> Iterator[tuple[str, list[tuple[str, object]]]]:
        """``(file, [(key, payload), ...])`` so that each file is opened once, in file order."""
        groups: dict[str, list[tuple[str, object]]] = defaultdict(list)
        for key, payload in keys:
            groups[self.key_to_file[key]].append((key, payload))
        yield from sorted(groups.items())


_PEFT_SEGMENTS = re.compile(r"\.(base_layer|original_module)(?=\.)|\.modules_to_save\.[^.]+(?=\.)")


def base_checkpoint_key(name: str) -> str:
    """A PEFT model's parameter/buffer name -> the plain model's key.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``;
    ``...lm_head.original_module.weight`` / ``...lm_head.modules_to_save.default.weight`` -> ``...lm_head.weight``
    (the trained copy of a ``modules_to_save`` module starts from the base weights).
    """
    name = name.removeprefix("base_model.model.")
    return _PEFT_SEGMENTS.sub("", name)


def read_slice(handle, key: str, index: tuple[slice, ...]) -> Tensor:
    """``checkpoint[key][index]`` read from an open ``safe_open`` handle (only those bytes are copied)."""
    piece = handle.get_slice(key)
    if not index:
        return piece[:]
    return piece[index]


def read_flat_range(handle, key: str, start: int, stop: int) -> Tensor:
    """Elements ``[start, stop)`` of ``checkpoint[key].flatten()`` (reads the rows of dim 0 that overlap, then cuts)."""
    piece = handle.get_slice(key)
    shape = piece.get_shape()
    if stop <= start:
        return torch.empty(0)
    if len(shape) <= 1:
        return piece[start:stop].reshape(-1)
    row = 1
    for size in shape[1:]:
        row *= size
    first, last = start // row, (stop + row - 1) // row
    rows = piece[first:last].reshape(-1)
    return rows[start - first * row : stop - first * row]


def names_by_tensor(module: nn.Module) -> dict[int, list[str]]:
    """``{id(tensor): [every name it has]}`` for parameters and buffers (tied weights have several names)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in module.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    for name, buffer in module.named_buffers(remove_duplicate=False):
        if buffer is not None:
            names[id(buffer)].append(name)
    return names


@dataclass
class KeyMatch:
    """Where each parameter / persistent buffer of a model comes from in a checkpoint (see
    :func:`match_checkpoint_keys`)."""

    found: list[tuple[str, str, Tensor]] = field(default_factory=list)  # (checkpoint key, name, tensor)
    skipped: list[str] = field(default_factory=list)  # names the caller asked to skip (e.g. adapter tensors)
    missing: list[str] = field(default_factory=list)  # the checkpoint key each unmatched tensor would have had


def match_checkpoint_keys(
    module: nn.Module, index: CheckpointIndex, prefix: str | None, skip: Callable[[str], bool] | None = None
) -> KeyMatch:
    """Match every parameter and persistent buffer of ``module`` (a plain or PEFT-wrapped model) to its checkpoint
    key. A tied tensor is matched once, under whichever of its names the checkpoint has; PEFT's name segments are
    dropped (:func:`base_checkpoint_key`); the base model prefix (``model.``) may be present in the checkpoint or not.
    """
    state = dict(module.state_dict(keep_vars=True))
    names_of = names_by_tensor(module)
    match, seen = KeyMatch(), set()
    for name, tensor in state.items():
        if id(tensor) in seen:
            continue  # tied: matched once
        seen.add(id(tensor))
        if skip is not None and skip(name):
            match.skipped.append(name)
            continue
        candidates = [base_checkpoint_key(n) for n in names_of.get(id(tensor), [name]) if n in state]
        candidates = candidates or [base_checkpoint_key(name)]
        key = index.resolve(candidates, prefix)
        if key is None:
            match.missing.append(candidates[0])
        else:
            match.found.append((key, name, tensor))
    return match
