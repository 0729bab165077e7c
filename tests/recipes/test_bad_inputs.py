"""Bad inputs are refused with a message naming the file/key/module, the value and what would be valid, before
anything the user had (files, model) is modified."""

import hashlib
import json

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import boft_plugin
from boft_plugin.export.loading import BoftCheckpointError, load_adapter
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.toy.models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _state(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_untouched(model, before):
    after = _state(model)
    assert after.keys() == before.keys(), "modules were added or removed"
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1] == flag, name


@pytest.fixture
def adapter_dir(tmp_path):
    boft_plugin.register()
    model = get_peft_model(
        tiny_llama(),
        BOFTConfig(target_modules=TARGETS, boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    boft_plugin.unregister()
    return tmp_path / "adapter"


def test_stock_peft_cpu_adapter_with_wrong_factor_count_is_explained_and_loadable(tmp_path):
    with stock_peft_boft(multi_factor=False):  # stock PEFT on a machine without its extension
        stock = get_peft_model(
            tiny_llama(),
            BOFTConfig(target_modules=TARGETS, boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False),
        )
        expected = stock(IDS).logits
        stock.save_pretrained(tmp_path / "stock")
    assert json.loads((tmp_path / "stock" / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    files = _digest(tmp_path / "stock")
    boft_plugin.register()
    model = tiny_llama()
    before = _state(model)
    for attempt in (
        lambda: PeftModel.from_pretrained(model, tmp_path / "stock"),
        lambda: load_adapter(model, tmp_path / "stock"),
    ):
        with pytest.raises(BoftCheckpointError) as info:
            attempt()
        text = str(info.value)
        assert "model.layers.0.self_attn.q_proj.boft_R: shape (1, 16, 4, 4) in the file, (2, 16, 4, 4) expected" in text
        assert "says boft_n_butterfly_factor=2 but the tensors hold 1 factor(s)" in text
        assert "butterfly_factor='tensors'" in text
        _assert_untouched(model, before)
    assert _digest(tmp_path / "stock") == files
    loaded = load_adapter(model, tmp_path / "stock", butterfly_factor="tensors")
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 1
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5)


def test_truncated_and_corrupted_safetensors(adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    model = tiny_llama()
    before = _state(model)
    for damaged in (data[: len(data) // 2], b"\x00" * 64):
        weights.write_bytes(damaged)
        with pytest.raises(BoftCheckpointError, match=r"adapter_model.safetensors: truncated or corrupted \(\d+ bytes"):
            load_adapter(model, adapter_dir)
        assert weights.read_bytes() == damaged
        _assert_untouched(model, before)


def test_damaged_config(adapter_dir):
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "BOFT", ')
    with pytest.raises(BoftCheckpointError, match="adapter_config.json: not valid JSON"):
        load_adapter(tiny_llama(), adapter_dir)
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(BoftCheckpointError, match="peft_type is 'LORA'"):
        load_adapter(tiny_llama(), adapter_dir)


def test_adapter_for_another_base_model(adapter_dir):
    other = tiny_llama(num_hidden_layers=3, hidden_size=96, intermediate_size=128)
    before = _state(other)
    with pytest.raises(BoftCheckpointError) as info:
        load_adapter(other, adapter_dir)
    text = str(info.value)
    assert "model.layers.0.self_attn.q_proj.boft_R: shape (2, 16, 4, 4) in the file, (2, 24, 4, 4) expected" in text
    assert "model.layers.2.self_attn.q_proj: targeted by the config in this model, but the file has no tensors" in text
    _assert_untouched(other, before)
    boft_plugin.register()
    with pytest.raises(BoftCheckpointError, match="the adapter was not added"):
        PeftModel.from_pretrained(other, adapter_dir)
    _assert_untouched(other, before)
    smaller = tiny_llama(num_hidden_layers=1)
    with pytest.raises(
        BoftCheckpointError, match=r"layers.1.self_attn.q_proj: the file has an adapter for this module"
    ):
        load_adapter(smaller, adapter_dir)


def test_nan_in_adapter_weights(adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.mlp.down_proj.boft_R"
    tensors[key][0, 0, 0, 0] = float("nan")
    save_file(tensors, weights)
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(BoftCheckpointError, match=key.replace(".", r"\.") + r": 1 of \d+ values are NaN or Inf"):
        load_adapter(model, adapter_dir)
    boft_plugin.register()
    with pytest.raises(BoftCheckpointError, match="NaN or Inf"):
        PeftModel.from_pretrained(model, adapter_dir)
    _assert_untouched(model, before)


def test_non_finite_rotation_is_detected_after_the_optimizer_step(registered):
    model = get_peft_model(
        tiny_llama(), BOFTConfig(target_modules=TARGETS, boft_block_size=4, boft_n_butterfly_factor=2)
    ).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    model(IDS).logits.sum().backward()
    optimizer.step()  # finite: no error
    model(IDS).logits.sum().backward()
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.boft_R["default"][1, 3, 0, 1] = float("inf")
    with pytest.raises(boft_plugin.BoftNumericsError, match=r"layer model\.layers\.1\.mlp\.down_proj, adapter 'def"):
        optimizer.step()


def test_pickle_checkpoint_is_refused_unless_opted_in(adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    model = tiny_llama()
    with pytest.raises(BoftCheckpointError, match="pickle-based checkpoint, which is refused by default"):
        load_adapter(model, adapter_dir)
    assert not any("boft" in n for n, _ in model.named_parameters())
    loaded = load_adapter(model, adapter_dir, allow_pickle=True)
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape == (2, 16, 4, 4)


def test_target_modules_that_match_nothing(registered):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(model, BOFTConfig(target_modules=["qproj"], boft_block_size=4))
    _assert_untouched(model, before)
