"""The streaming merged export writes what save_pretrained writes: the same shards (byte for byte with an identity
adapter), the same index, the tied weight once; with a trained adapter it reloads in plain transformers with the
adapted model's logits; a failure while writing publishes nothing."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from peft import BOFTConfig, get_peft_model

import boft_plugin
from boft_plugin.testing.models import max_rel_err
from boft_plugin.toy.models import tiny_llama


def _base(tie: bool):
    return tiny_llama(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=tie)


def _adapted(tie: bool, init_weights: bool = True):
    base = _base(tie)
    boft_plugin.register()
    try:
        config = BOFTConfig(target_modules="all-linear", boft_block_size=4, boft_n_butterfly_factor=2)
        config.init_weights = init_weights
        return base, get_peft_model(base, config)
    finally:
        boft_plugin.unregister()


@pytest.mark.parametrize("tie", [False, True])
def test_identity_adapter_export_is_byte_identical_to_save_pretrained(tmp_path, tie):
    _, model = _adapted(tie)
    boft_plugin.export_merged(model, tmp_path / "ours", max_shard_size="40KB")
    _base(tie).save_pretrained(tmp_path / "reference", max_shard_size="40KB")  # the same weights, never adapted
    shards = sorted(p.name for p in (tmp_path / "reference").glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors")) == shards
    for name in shards:
        assert filecmp.cmp(tmp_path / "ours" / name, tmp_path / "reference" / name, shallow=False), name
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    reference = json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == reference["weight_map"]
    assert ("lm_head.weight" in ours["weight_map"]) is not tie  # a tied weight is written once


def test_trained_adapter_reloads_with_the_adapted_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = _adapted(tie=False, init_weights=False)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    boft_plugin.export_merged(model, tmp_path / "merged", max_shard_size="40KB")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert max_rel_err(plain(input_ids=ids).logits, expected) < 1e-5


def test_a_failed_write_publishes_nothing_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    from boft_plugin.export import safetensors_stream

    _, model = _adapted(tie=False)
    boft_plugin.export_merged(model, tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    calls = []

    def failing_write(self, entry, value):
        calls.append(entry.key)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, entry, value)

    original = safetensors_stream.ShardWriter.write
    monkeypatch.setattr(safetensors_stream.ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        boft_plugin.export_merged(model, tmp_path / "merged")
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind
