"""The public sharding API in one process (a 1-rank gloo group): placements, wrong orders, guarded saves."""

import pytest
import torch
from peft import BOFTConfig, get_peft_model
from safetensors.torch import load_file

import boft_plugin
from boft_plugin.distributed.fsdp2.shard import ShardingOrderError, shard_for_fsdp2
from boft_plugin.distributed.report import adapter_shards, format_shards
from boft_plugin.toy.models import tiny_llama

CONFIG = dict(target_modules=["q_proj", "down_proj"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)


def _adapted():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), BOFTConfig(**CONFIG))


def test_adapter_added_after_fully_shard_is_refused(registered, one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    fully_shard(model)
    with pytest.raises(ShardingOrderError, match="already sharded with FSDP2"):
        get_peft_model(model, BOFTConfig(**CONFIG))
    assert not any("boft" in name for name, _ in model.named_parameters())


def test_shard_needs_an_adapter_and_only_once(registered, one_rank_group):
    with pytest.raises(ShardingOrderError, match="no BOFT adapter found"):
        shard_for_fsdp2(tiny_llama())
    model = shard_for_fsdp2(_adapted())
    with pytest.raises(ShardingOrderError, match="already sharded"):
        shard_for_fsdp2(model)


def test_sharded_model_computes_and_exports_as_before(registered, one_rank_group, tmp_path):
    model = _adapted()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits.detach()
    before = {k: v.clone() for k, v in model.state_dict().items() if "boft_" in k}
    shard_for_fsdp2(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.boft_block_major["default"] and tuple(layer.boft_R["default"].shape) == (16, 2, 4, 4)
    assert torch.allclose(model(ids).logits, expected, atol=1e-6)
    rows = adapter_shards(model)
    assert {r.layout for r in rows} == {"fsdp2"} and all(r.whole_blocks for r in rows)
    assert "| 0 | base_model.model.model.layers.0.self_attn.q_proj.boft_R.default | fsdp2 |" in format_shards(rows)
    boft_plugin.export_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key, value in before.items():
        assert torch.equal(saved[key.replace(".default", "")], value), key  # PEFT's (m, N, b, b) layout


def test_plain_save_pretrained_of_sharded_adapter_is_refused(registered, one_rank_group, tmp_path):
    model = shard_for_fsdp2(_adapted())
    with pytest.raises(boft_plugin.BoftSaveError, match="export_adapter"):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "adapter_model.safetensors").exists()


def test_block_major_adapter_saves_and_loads_in_peft_layout(registered, tmp_path):
    """Any PEFT save of a block-major (FSDP2-layout) adapter writes (m, N, b, b); loading transposes back."""
    from boft_plugin.distributed.fsdp2.shard import boft_layers

    model = _adapted()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits.detach()
    before = {k: v.clone() for k, v in model.state_dict().items() if "boft_R" in k}
    for layer in boft_layers(model):
        layer.store_block_major("default")
    model.save_pretrained(tmp_path / "saved")  # plain tensors: PEFT's own path
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    for key, value in before.items():
        assert torch.equal(saved[key.replace(".default", "")], value), key
    model.load_adapter(tmp_path / "saved", adapter_name="again")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.boft_block_major.get("again")
    model.set_adapter("again")
    assert torch.allclose(model(ids).logits, expected, atol=1e-6)


def test_every_block_major_adapter_of_a_layer_exports_in_peft_layout(registered, one_rank_group, tmp_path):
    """DPO's policy and reference adapters share each layer; both are stored block-major and both must be
    written in PEFT's (m, N, b, b) layout, by the exporter and by a plain save."""
    from boft_plugin.distributed.fsdp2.shard import boft_layers

    model = _adapted()
    model.add_adapter("reference", BOFTConfig(**CONFIG))
    before = {k: v.clone() for k, v in model.state_dict().items() if "boft_R" in k}
    assert {k.rsplit(".", 1)[1] for k in before} == {"default", "reference"}
    shard_for_fsdp2(model)
    assert all(layer.boft_block_major == {"default": True, "reference": True} for layer in boft_layers(model))
    boft_plugin.export_adapter(model, tmp_path / "export")
    for adapter, sub in (("default", ""), ("reference", "reference")):
        saved = load_file(tmp_path / "export" / sub / "adapter_model.safetensors")
        for key, value in before.items():
            if key.endswith(f".{adapter}"):
                assert torch.equal(saved[key.removesuffix(f".{adapter}")], value), (adapter, key)
