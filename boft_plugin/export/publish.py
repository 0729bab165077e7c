"""How every export reaches its directory: the result is exactly the new export, and nothing else is lost.

- A directory the exporter *owns* (absent, empty, or holding exactly an earlier export of the same kind, as its
  ``.boft_export.json`` lists) is replaced whole, atomically: a kill leaves the old export or the new one.
- A directory shared with other files (a run's ``output_dir`` with its checkpoints, logs and tokenizer; a user's
  folder) is published entry by entry: each file of the export replaces its namesake atomically, weight files of
  another format or layout that loaders would prefer over the new ones are removed in the same publish, and every
  other entry is left as it was.

The marker names the export's files so that a later export can tell its own directory from a user's; it is hidden
and never uploaded (``recipes.hub``).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..runtime.atomic import atomic_directory, is_staging_name, remove_stale_staging

__all__ = ["ADAPTER_WEIGHTS", "EXPORT_MARKER", "MODEL_WEIGHTS", "owns_directory", "publish_export"]

EXPORT_MARKER = ".boft_export.json"
# weight files PEFT loads for an adapter (safetensors first, then the pickle)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# weight files transformers' from_pretrained considers for a model; model.safetensors wins over a sharded index
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-*-of-*.bin",
    "tf_model.h5",
    "flax_model.msgpack",
)


def _marker(directory: Path) -> dict:
    try:
        value = json.loads((directory / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def owns_directory(directory: str | os.PathLike, kind: str) -> bool:
    """Whether ``directory`` may be replaced whole by an export of ``kind``: it does not exist, is empty, or holds
    exactly what an earlier export of that kind listed (nothing another tool or the user added)."""
    root = Path(directory)
    if not root.exists():
        return True
    if not root.is_dir() or root.is_symlink():
        return False
    entries = {name for name in os.listdir(root) if not is_staging_name(name)}
    if not entries:
        return True
    marker = _marker(root)
    listed = set(marker.get("files") or [])
    return marker.get("kind") == kind and entries - {EXPORT_MARKER} <= listed


def _stale(directory: Path, patterns: tuple[str, ...]) -> list[str]:
    if not directory.is_dir():
        return []
    return [name for name in os.listdir(directory) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


@contextmanager
def publish_export(target: str | os.PathLike, kind: str, weights: tuple[str, ...]) -> Iterator[Path]:
    """Yield a staging directory for an export of ``kind`` whose weight files match ``weights``; publish it into
    ``target`` on normal exit (see the module docstring), leave ``target`` as it was on an exception."""
    target = Path(target).absolute()
    remove_stale_staging(target.parent)
    remove_stale_staging(target)
    whole = owns_directory(target, kind)
    remove = [] if whole else _stale(target, weights)
    with atomic_directory(target, replace=whole, remove=remove) as staging:
        yield staging
        if whole:
            files = sorted(os.listdir(staging))
            (staging / EXPORT_MARKER).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")
