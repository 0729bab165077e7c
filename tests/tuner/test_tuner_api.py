"""PEFT's adapter API on our layers: several adapters, disable/delete, merge, dropout, bias, dtypes, Conv1D."""

import copy

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model
from peft.tuners.boft.layer import BOFTLayer

import boft_plugin
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.testing.models import MLP, build_pair, max_rel_err
from boft_plugin.tuner import BoftConv2d, BoftLinear


def _cfg(**kw):
    base = dict(target_modules=["lin0", "lin1"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
    base.update(kw)
    return BOFTConfig(**base)


def _adapted(**kw):
    torch.manual_seed(0)
    return get_peft_model(MLP(), _cfg(**kw))


def test_layers_are_ours_and_peft_boft_layers(registered):
    model = _adapted()
    layer = model.base_model.model.lin0
    assert isinstance(layer, BoftLinear) and isinstance(layer, BOFTLayer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{m}.boft_{p}.default" for m in ("lin0", "lin1") for p in ("R", "s")}


def test_identity_at_init_equals_base_model(registered):
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(4, 64)
    expected = base(x)
    model = get_peft_model(copy.deepcopy(base), _cfg(init_weights=True))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_disable_adapter_gives_base_output_and_restores(registered):
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(4, 64)
    expected_base = base(x)
    model = get_peft_model(copy.deepcopy(base), _cfg())
    adapted = model(x)
    assert not torch.allclose(adapted, expected_base, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(model(x), expected_base, atol=1e-6)
    assert torch.allclose(model(x), adapted)


def test_two_adapters_active_together_match_stock_peft():
    # Stock PEFT keeps one permutation buffer per layer (boft_P), so its adapters must share a geometry here.
    torch.manual_seed(0)
    stock, ours = build_pair(MLP().double(), _cfg().__dict__.copy())
    with stock_peft_boft():
        stock.add_adapter("other", _cfg())
    boft_plugin.register()
    ours.add_adapter("other", _cfg())
    boft_plugin.unregister()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(3, 64, dtype=torch.float64)
    with stock_peft_boft():
        stock.base_model.set_adapter(["default", "other"])
        expected = stock(x)
        stock.base_model.set_adapter("default")
        expected_default = stock(x)
    assert max_rel_err(expected, expected_default) > 1e-3
    ours.base_model.set_adapter(["default", "other"])
    assert max_rel_err(ours(x), expected) < 1e-10
    # merging both, in order, equals the two active adapters
    ours.base_model.merge_adapter(["default", "other"])
    assert max_rel_err(ours(x), expected) < 1e-10
    ours.base_model.unmerge_adapter()
    assert max_rel_err(ours(x), expected) < 1e-10


def test_adapters_with_different_geometries_on_one_layer(registered):
    model = _adapted()
    model.add_adapter("other", _cfg(boft_block_size=8, boft_n_butterfly_factor=3))
    layer = model.base_model.model.lin0
    x = torch.randn(3, 64, dtype=torch.float32)
    model.base_model.set_adapter(["default", "other"])
    both = model(x)
    # equals applying "other" first, then "default", by hand (PEFT's order), scales multiplied
    manual = x
    for name in ("other", "default"):
        manual = manual @ torch.block_diag(*layer.effective_blocks(name))
    scale = layer.boft_s["default"].squeeze(-1) * layer.boft_s["other"].squeeze(-1)
    base = layer.base_layer
    expected_lin0 = (manual @ base.weight.T) * scale + base.bias
    assert torch.allclose(layer(x), expected_lin0, atol=1e-5)
    assert both.shape == (3, 24)


def test_set_adapter_delete_adapter_and_trainability(registered):
    model = _adapted()
    model.add_adapter("second", _cfg(boft_block_size=8, boft_n_butterfly_factor=1))
    layer = model.base_model.model.lin0
    assert layer.boft_R["second"].shape == (1, 8, 8, 8)
    assert not layer.boft_R["second"].requires_grad and layer.boft_R["default"].requires_grad
    x = torch.randn(2, 64)
    out_default = model(x)
    model.set_adapter("second")
    assert layer.boft_R["second"].requires_grad and not layer.boft_R["default"].requires_grad
    out_second = model(x)
    assert not torch.allclose(out_default, out_second)
    model.delete_adapter("second")
    assert "second" not in layer.boft_R and "second" not in layer.boft_geometry
    model.set_adapter("default")
    assert torch.allclose(model(x), out_default)


@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_roundtrip(registered, safe):
    model = _adapted(boft_n_butterfly_factor=3)
    x = torch.randn(5, 64)
    adapted = model(x)
    weight_before = model.base_model.model.lin0.base_layer.weight.clone()
    model.merge_adapter(safe_merge=safe) if not safe else model.base_model.merge_adapter(safe_merge=True)
    assert model.base_model.model.lin0.merged
    assert torch.allclose(model(x), adapted, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(model.base_model.model.lin0.base_layer.weight, weight_before, atol=1e-5)
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_weight_untouched(registered):
    model = _adapted()
    layer = model.base_model.model.lin0
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.boft_s["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_dropout_is_active_in_training_only(registered):
    model = _adapted(boft_dropout=0.5)
    x = torch.randn(3, 64)
    model.eval()
    eval_out = model(x)
    assert torch.equal(model(x), eval_out)
    model.train()
    torch.manual_seed(1)
    train_out = model(x)
    assert not torch.allclose(train_out, eval_out)
    train_out.sum().backward()
    assert model.base_model.model.lin0.boft_R["default"].grad is not None


@pytest.mark.parametrize("bias", ["all", "boft_only"])
def test_bias_modes_make_biases_trainable_and_saved(registered, tmp_path, bias):
    model = _adapted(bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin0.base_layer.bias" in trainable
    assert ("base_model.model.head.bias" in trainable) == (bias == "all")
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin0.base_layer.bias" in keys


def test_modules_to_save_and_layers_to_transform(registered, tmp_path):
    from transformers import AutoModelForCausalLM

    from boft_plugin.toy.models import tiny_llama_config

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=3))
    config = BOFTConfig(
        target_modules=["q_proj", "v_proj"],
        boft_block_size=8,
        boft_n_butterfly_factor=2,
        layers_to_transform=[0, 2],
        modules_to_save=["lm_head"],
    )
    model = get_peft_model(llama, config)
    layers = model.base_model.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, BoftLinear) and isinstance(layers[2].self_attn.v_proj, BoftLinear)
    assert isinstance(layers[1].self_attn.q_proj, torch.nn.Linear)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in keys) and not any("layers.1." in k for k in keys)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_keep_cayley_in_float32(registered, dtype):
    torch.manual_seed(0)
    base = MLP().to(dtype)
    model = get_peft_model(base, _cfg(boft_n_butterfly_factor=3))
    layer = model.base_model.model.lin0
    assert layer.boft_R["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype upcast
    x = torch.randn(4, 64).to(dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.boft_R["default"].grad.dtype == torch.float32
    # against the float64 computation of the same model
    ref = copy.deepcopy(model).double()
    assert max_rel_err(y.double(), ref(x.double())) < 0.05


def test_autocast_bf16_training_step(registered):
    model = _adapted(boft_n_butterfly_factor=3)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    grad = model.base_model.model.lin0.boft_R["default"].grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_conv1d_fan_in_fan_out_matches_linear_twin(registered):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(
            gpt2, BOFTConfig(target_modules=["c_attn"], boft_block_size=4, boft_n_butterfly_factor=3)
        )
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, BoftLinear) and layer.fan_in_fan_out
    with torch.no_grad():
        layer.boft_R["default"].normal_(0, 0.2)
        layer.boft_s["default"].normal_(1, 0.1)
    # the same adapter on an nn.Linear with the transposed weight
    twin_base = torch.nn.Sequential(torch.nn.Linear(32, 96))
    with torch.no_grad():
        twin_base[0].weight.copy_(layer.base_layer.weight.T)
        twin_base[0].bias.copy_(layer.base_layer.bias)
    twin = get_peft_model(twin_base, BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=3))
    twin.base_model.model[0].boft_R["default"].data.copy_(layer.boft_R["default"])
    twin.base_model.model[0].boft_s["default"].data.copy_(layer.boft_s["default"])
    x = torch.randn(2, 5, 32)
    assert torch.allclose(layer(x), twin(x), atol=1e-5)
    merged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), merged, atol=1e-5)


def test_conv2d_layer_is_ours_and_merges(registered):
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)

        def forward(self, x):
            return self.conv2d(x)

    torch.manual_seed(0)
    model = get_peft_model(Conv(), BOFTConfig(target_modules=["conv2d"], boft_block_size=6, init_weights=False))
    layer = model.base_model.model.conv2d
    assert isinstance(layer, BoftConv2d) and layer.boft_s["default"].shape == (1, 6)
    x = torch.randn(2, 4, 7, 7)
    y = model(x)
    layer.merge()
    assert torch.allclose(model(x), y, atol=1e-5)


def test_low_cpu_mem_usage_load_and_from_pretrained(registered, tmp_path):
    model = _adapted()
    x = torch.randn(2, 64)
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, low_cpu_mem_usage=True)
    assert isinstance(loaded.base_model.model.lin0, BoftLinear)
    assert torch.allclose(loaded(x), expected, atol=1e-6)


def test_merge_and_delta_weight_ignore_dropout_in_training(registered):
    model = _adapted(boft_dropout=0.5)
    model.train()
    layer = model.base_model.model.lin0
    first, _ = layer.get_delta_weight("default")
    second, _ = layer.get_delta_weight("default")
    assert torch.equal(first, second)
    before = layer.base_layer.weight.clone()
    layer.merge()
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, before, atol=1e-5)
