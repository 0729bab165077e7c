"""Atomic publishing of exports: nothing half-written, nothing else in the target deleted, failures leave
the previous export intact."""

import os

import pytest

from boft_plugin.runtime.atomic import atomic_directory


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_new_target_appears_at_once(tmp_path):
    with atomic_directory(tmp_path / "out") as staging:
        _write(staging / "adapter_model.safetensors", "w1")
        _write(staging / "adapter_config.json", "c1")
        assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_existing_target_keeps_foreign_files_and_replaces_ours(tmp_path):
    target = tmp_path / "out"
    _write(target / "checkpoint-10" / "trainer_state.json", "state")
    _write(target / "adapter_model.safetensors", "old weights")
    _write(target / "sub" / "adapter_config.json", "old sub")
    with atomic_directory(target) as staging:
        _write(staging / "adapter_model.safetensors", "new weights")
        _write(staging / "sub" / "adapter_config.json", "new sub")
    assert (target / "checkpoint-10" / "trainer_state.json").read_text() == "state"
    assert (target / "adapter_model.safetensors").read_text() == "new weights"
    assert (target / "sub" / "adapter_config.json").read_text() == "new sub"


def test_failure_while_writing_leaves_previous_export_untouched(tmp_path):
    target = tmp_path / "out"
    _write(target / "adapter_model.safetensors", "good")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        _write(staging / "adapter_model.safetensors", "half")
        raise RuntimeError("killed while writing")
    assert (target / "adapter_model.safetensors").read_text() == "good"
    assert sorted(os.listdir(tmp_path)) == ["out"]
