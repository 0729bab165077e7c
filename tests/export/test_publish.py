"""Every export is exactly the new export, loses nothing another tool wrote, and survives a kill at any moment
(boft_plugin.export.publish, boft_plugin.runtime.atomic; docs/reliability.md, "Exports")."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import BOFTConfig, get_peft_model
from transformers import AutoModelForCausalLM

import boft_plugin
from boft_plugin.distributed.checkpoint_files import CheckpointIndex
from boft_plugin.errors import SingleFactorError
from boft_plugin.export.publish import EXPORT_MARKER
from boft_plugin.export.single_factor import convert_to_single_factor
from boft_plugin.runtime import atomic
from boft_plugin.runtime.launchers import cpu_env
from boft_plugin.testing.models import max_rel_err
from boft_plugin.toy.models import tiny_llama

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def adapted(seed: int):
    """The same base, a random adapter drawn from ``seed``."""
    base = tiny_llama(seed=0)
    torch.manual_seed(seed)
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"])
    config.init_weights = False
    return get_peft_model(base, config).eval()


def logits_of(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory).eval()(input_ids=IDS).logits


def merged_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_reexport_with_another_layout_loads_as_the_new_model(tmp_path, registered):
    old, new = adapted(1), adapted(2)
    assert max_rel_err(merged_logits(old), merged_logits(new)) > 0.05  # two different models
    target = tmp_path / "merged"
    boft_plugin.export_merged(old, target)  # one model.safetensors
    boft_plugin.export_merged(new, target, max_shard_size="200KB")  # now sharded, with an index
    names = sorted(os.listdir(target))
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert max_rel_err(logits_of(target), merged_logits(new)) < 1e-5  # transformers loads the NEW model


def test_a_reexport_into_another_tools_directory_keeps_its_files(tmp_path, registered):
    target = tmp_path / "published"
    tiny_llama(seed=3).save_pretrained(target)  # another tool's single-file model
    (target / "README.md").write_text("the user's notes")
    new = adapted(2)
    boft_plugin.export_merged(new, target, max_shard_size="200KB")
    assert (target / "README.md").read_text() == "the user's notes"
    assert not (target / "model.safetensors").exists()  # the layout loaders would prefer is gone
    assert not (target / EXPORT_MARKER).exists()  # not the exporter's own directory: not claimed
    assert max_rel_err(logits_of(target), merged_logits(new)) < 1e-5


KILLER = r"""
import os, sys, torch
from peft import BOFTConfig, get_peft_model
import boft_plugin
from boft_plugin.runtime import atomic
from boft_plugin.toy.models import tiny_llama

point, target = sys.argv[1], sys.argv[2]
calls = {"n": 0}

def dying(real):
    def call(*args):
        calls["n"] += 1
        if point == f"before-{calls['n']}":
            os._exit(9)
        result = real(*args)
        if point == f"after-{calls['n']}":
            os._exit(9)
        return result
    return call

class OsSeenByAtomic:  # every rename the publish makes goes through here
    rename = staticmethod(dying(os.rename))
    replace = staticmethod(dying(os.replace))
    def __getattr__(self, name):
        return getattr(os, name)

atomic.os = OsSeenByAtomic()
atomic._exchange = dying(atomic._exchange)
boft_plugin.register()
base = tiny_llama(seed=0)
torch.manual_seed(2)
model = get_peft_model(base, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                       target_modules=["q_proj", "v_proj"], init_weights=False)).eval()
boft_plugin.export_merged(model, target, max_shard_size="200KB")
print("renames", calls["n"])
"""


def test_a_kill_at_any_rename_leaves_the_old_or_the_new_export(tmp_path, registered):
    old, new = adapted(1), adapted(2)
    want = {"old": merged_logits(old), "new": merged_logits(new)}
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    def export(point: str, target: Path) -> subprocess.CompletedProcess:
        boft_plugin.export_merged(old, target)  # an earlier export of the exporter's own directory
        command = [sys.executable, str(script), point, str(target)]
        return subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=300)

    probe = export("none", tmp_path / "probe")
    assert probe.returncode == 0, probe.stderr[-2000:]
    renames = int(probe.stdout.split("renames")[-1])
    assert renames >= 1
    seen = set()
    for point in [f"{when}-{k}" for k in range(1, renames + 1) for when in ("before", "after")]:
        target = tmp_path / point
        killed = export(point, target)
        assert killed.returncode == 9, killed.stderr[-2000:]
        got = logits_of(target)
        which = min(want, key=lambda k: max_rel_err(got, want[k]))
        assert max_rel_err(got, want[which]) < 1e-5, point  # a whole model, never a mix of the two
        seen.add(which)
    assert seen == {"old", "new"}
    atomic.remove_stale_staging(tmp_path)  # what the next export does: the killed processes' staging goes
    assert [n for n in os.listdir(tmp_path) if atomic.is_staging_name(n)] == []


def test_staging_is_on_the_targets_own_filesystem(tmp_path, monkeypatch, registered):
    """The target acts as a filesystem of its own (an output_dir that is a mount point): a rename into or out of it
    fails with EXDEV. The adapter export still publishes, since it stages inside the target."""
    target = tmp_path / "mount"
    (target / "checkpoint-2").mkdir(parents=True)

    def inside(path) -> bool:
        path = Path(path).absolute()
        return path == target or target in path.parents

    def same_filesystem(real):
        def rename(src, dst):
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst)

        return rename

    monkeypatch.setattr(atomic.os, "rename", same_filesystem(os.rename))
    monkeypatch.setattr(atomic.os, "replace", same_filesystem(os.replace))
    staged = []
    original = atomic.atomic_directory

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with original(*args, **kwargs) as staging:
            staged.append(staging)
            yield staging

    monkeypatch.setattr("boft_plugin.export.publish.atomic_directory", recording)
    boft_plugin.export_adapter(adapted(1), target)
    assert staged and staged[0].parent == target
    assert (target / "adapter_model.safetensors").is_file() and (target / "checkpoint-2").is_dir()


def test_every_exported_file_follows_the_umask(tmp_path, registered):
    previous = os.umask(0o022)
    try:
        boft_plugin.export_adapter(adapted(1), tmp_path / "adapter")
        boft_plugin.export_merged(adapted(1), tmp_path / "merged")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes  # PEFT's safetensors writer alone makes 0600 files


def test_stale_staging_of_dead_processes_on_this_host_is_removed(tmp_path):
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{atomic.STAGING_PREFIX}{host}-{dead.pid}-deadbeef-merged"
    live = tmp_path / f"{atomic.STAGING_PREFIX}{host}-{os.getpid()}-cafebabe-merged"
    elsewhere = tmp_path / f"{atomic.STAGING_PREFIX}otherhost-{dead.pid}-0badf00d-merged"
    for path in (stale, live, elsewhere):
        (path / "model.safetensors").parent.mkdir(parents=True)
    assert atomic.remove_stale_staging(tmp_path) == [stale]
    assert live.is_dir() and elsewhere.is_dir() and not stale.exists()


def test_index_shard_names_stay_inside_the_checkpoint(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match="shard name '../../etc/passwd' is not a plain file name"):
        CheckpointIndex(tmp_path)


def test_convert_copies_only_the_adapter_and_refuses_links(tmp_path, registered):
    run = tmp_path / "run"
    boft_plugin.export_adapter(adapted(1), run)
    (run / "checkpoint-2").mkdir()
    (run / "merged").mkdir()
    (run / "tokenizer_config.json").write_text("{}")
    (run / "boft_run_summary.json").write_text("{}")
    summary = convert_to_single_factor(run, tmp_path / "single")
    assert sorted(os.listdir(tmp_path / "single")) == [
        EXPORT_MARKER,
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
    ]
    assert set(summary["not_copied"]) >= {"checkpoint-2", "merged", "boft_run_summary.json"}
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((run / "adapter_config.json").read_text())
    (linked / "adapter_model.safetensors").symlink_to(run / "adapter_model.safetensors")
    with pytest.raises(SingleFactorError, match="adapter_model.safetensors is a symbolic link"):
        convert_to_single_factor(linked, tmp_path / "single2")
    assert not (tmp_path / "single2").exists()
