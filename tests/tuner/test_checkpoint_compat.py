"""Adapters move both ways between boft_plugin and stock PEFT, file for file (docs/design.md, "Checkpoint contract")."""

import json

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import boft_plugin
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.toy.models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(factors: int) -> BOFTConfig:
    return BOFTConfig(
        target_modules=TARGETS, boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False, bias="none"
    )


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _save(model, path):
    model.save_pretrained(path)
    return json.loads((path / "adapter_config.json").read_text()), load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("factors", [1, 2, 4])
def test_files_written_are_those_stock_peft_writes(tmp_path, factors):
    torch.manual_seed(0)
    with stock_peft_boft():
        stock_cfg, stock_tensors = _save(get_peft_model(tiny_llama(), _config(factors)), tmp_path / "stock")
    boft_plugin.register()
    ours_cfg, ours_tensors = _save(get_peft_model(tiny_llama(), _config(factors)), tmp_path / "ours")
    assert ours_cfg == stock_cfg
    assert ours_cfg["peft_type"] == "BOFT" and ours_cfg["boft_n_butterfly_factor"] == factors
    assert {k: v.shape for k, v in ours_tensors.items()} == {k: v.shape for k, v in stock_tensors.items()}
    assert any(k.endswith("layers.1.mlp.down_proj.boft_R") for k in ours_tensors)
    assert not any("boft_P" in k for k in ours_tensors)


@pytest.mark.parametrize("factors", [1, 2, 4])
def test_ours_to_stock_and_back_give_identical_logits(tmp_path, factors):
    ids = _ids()
    boft_plugin.register()
    ours = get_peft_model(tiny_llama(), _config(factors))
    expected = ours(ids).logits
    ours.save_pretrained(tmp_path / "ours")
    boft_plugin.unregister()

    # m = 1 loads in PEFT as shipped; m > 1 needs PEFT's extension, emulated by the oracle patch.
    with stock_peft_boft(multi_factor=factors > 1):
        stock = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
        assert torch.allclose(stock(ids).logits, expected, atol=1e-5, rtol=1e-5)
        # perturb in stock PEFT, save, and load the result back into ours
        with torch.no_grad():
            for name, p in stock.named_parameters():
                if "boft_R" in name:
                    p.add_(0.05 * torch.randn_like(p))
        stock_logits = stock(ids).logits
        stock.save_pretrained(tmp_path / "stock")
    assert not torch.allclose(stock_logits, expected, atol=1e-4)

    boft_plugin.register()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "stock")
    layer = reloaded.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "BoftLinear" and layer.boft_R["default"].shape[0] == factors
    assert torch.allclose(reloaded(ids).logits, stock_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factors", [1, 3])
def test_merge_and_unload_equals_adapted_forward_and_stock_merge(factors):
    ids = _ids()
    config = BOFTConfig(target_modules=TARGETS, boft_block_size=2, boft_n_butterfly_factor=factors, init_weights=False)
    with stock_peft_boft():
        stock = get_peft_model(tiny_llama(), config)
        with torch.no_grad():
            for p in stock.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))  # differ from what a fresh init would give
        adapter_state = {k: v.clone() for k, v in stock.state_dict().items() if "boft_" in k}
        stock_merged = stock.merge_and_unload()(ids).logits
    boft_plugin.register()
    ours = get_peft_model(tiny_llama(), config)
    missing, unexpected = ours.load_state_dict(adapter_state, strict=False)
    assert not unexpected and not any("boft_" in k for k in missing)
    adapted = ours(ids).logits
    merged_model = ours.merge_and_unload()
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert not any("boft" in n for n, _ in merged_model.named_parameters())
    merged = merged_model(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-5)
    assert torch.allclose(merged, stock_merged, atol=1e-5, rtol=1e-5)
