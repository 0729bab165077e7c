"""Signed completion markers: how a run tells its own checkpoints from ones someone else wrote.

Resuming a DeepSpeed or FSDP2 (torch.distributed.checkpoint) checkpoint unpickles files on every rank, which runs
any code they hold (docs/reliability.md, "Checkpoint trust"). A checkpoint boft-plugin wrote for *this user* carries
a completion marker signed with HMAC-SHA256 under a key only this user can read (``~/.cache/boft-plugin/
checkpoint.key``, mode 0600, made on first use; ``$BOFT_PLUGIN_KEY_FILE`` points elsewhere). The signature covers the
marker's fields and the name and size of every file in the checkpoint, so a marker copied into another checkpoint,
or a checkpoint whose files were swapped for others, no longer verifies. Anything that does not verify needs the
recipe key ``trust_checkpoint: true`` before its pickles are loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

__all__ = ["KEY_ENV", "file_listing", "key_file", "sign", "verify"]

KEY_ENV = "BOFT_PLUGIN_KEY_FILE"
UNSIGNED_NAMES = frozenset({"boft_checkpoint_complete.json", "boft_checkpoint_pending.json"})


def key_file() -> Path:
    """Where this user's signing key lives."""
    override = os.environ.get(KEY_ENV)
    if override:
        return Path(override)
    cache = os.environ.get("BOFT_PLUGIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "boft-plugin")
    return Path(cache) / "checkpoint.key"


def _key(create: bool) -> bytes | None:
    path = key_file()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: two processes creating the key at once agree on one file
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def file_listing(checkpoint: str | os.PathLike) -> dict[str, int]:
    """``{relative path: size}`` of every regular file in ``checkpoint`` except its markers (symlinks as -1)."""
    root = Path(checkpoint)
    listing: dict[str, int] = {}
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            if relative in UNSIGNED_NAMES:
                continue
            listing[relative] = -1 if path.is_symlink() else path.stat().st_size
    return listing


def _message(fields: dict, listing: dict[str, int]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "signature"}
    return json.dumps({"marker": body, "files": listing}, sort_keys=True, separators=(",", ":")).encode()


def sign(fields: dict, checkpoint: str | os.PathLike) -> str:
    """HMAC-SHA256 (hex) of ``fields`` and the checkpoint's file listing under this user's key."""
    return hmac.new(_key(create=True), _message(fields, file_listing(checkpoint)), hashlib.sha256).hexdigest()


def verify(fields: dict, checkpoint: str | os.PathLike) -> bool:
    """Whether ``fields["signature"]`` was made by this user's key over exactly these fields and files."""
    signature = fields.get("signature")
    key = _key(create=False)
    if not isinstance(signature, str) or key is None:
        return False
    expected = hmac.new(key, _message(fields, file_listing(checkpoint)), hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, expected)
