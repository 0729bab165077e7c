"""Bad geometry is rejected before any layer is replaced, with one error naming every offending module."""

import pytest
import torch
from peft import BOFTConfig, get_peft_model

from boft_plugin.testing.models import MLP
from boft_plugin.tuner import BoftTargetError
from boft_plugin.tuner.geometry import GeometryError, resolve_geometry


def _snapshot(model):
    return {n: (type(m), tuple(p.data_ptr() for p in m.parameters(recurse=False))) for n, m in model.named_modules()}


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(boft_block_size=5), r"lin0 \(width 64\): width 64 is not divisible by boft_block_size=5"),
        (
            dict(boft_block_size=6, boft_n_butterfly_factor=2),
            r"(?s)1 module\(s\).*lin0 \(width 64\).*valid boft_block_size for width 64 with boft_n_butterfly_factor=2: "
            r"2, 4, 8, 16, 32$",
        ),
        (dict(boft_block_size=16, boft_n_butterfly_factor=4), r"boft_block_size\*2\*\*\(m-1\)=128"),
        (dict(boft_block_size=0, boft_block_num=6, boft_n_butterfly_factor=2), r"boft_block_num=6.*64"),
        (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=4), r"multiple of 2\*\*\(m-1\)=8"),
        (dict(boft_block_size=3, boft_n_butterfly_factor=2), r"must be even"),
    ],
)
def test_bad_geometry_lists_modules_and_changes_nothing(registered, config, message):
    torch.manual_seed(0)
    model = MLP(width=64, hidden=96)
    before = _snapshot(model)
    with pytest.raises(BoftTargetError, match=message) as info:
        get_peft_model(model, BOFTConfig(target_modules=["lin0", "lin1", "head"], **config))
    assert "the model was not modified" in str(info.value)
    assert _snapshot(model) == before
    assert all(p.requires_grad for p in model.parameters())


def test_every_offending_module_is_listed_once(registered):
    model = MLP(width=60, hidden=100)
    with pytest.raises(BoftTargetError) as info:
        get_peft_model(model, BOFTConfig(target_modules=["lin0", "lin1", "head"], boft_block_size=8))
    text = str(info.value)
    assert "cannot be applied to 3 module(s)" in text
    for line in ("- lin0 (width 60)", "- lin1 (width 100)", "- head (width 100)"):
        assert text.count(line) == 1


def test_butterfly_factor_is_never_changed(registered):
    model = get_peft_model(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2, boft_n_butterfly_factor=5))
    assert model.base_model.model.lin0.boft_R["default"].shape == (5, 32, 2, 2)
    assert model.peft_config["default"].boft_n_butterfly_factor == 5


def test_unsupported_layer_types_are_rejected_up_front(registered):
    class WithEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.lin = torch.nn.Linear(8, 8)
            self.grouped = torch.nn.Conv2d(4, 4, 1, groups=2)

    model = WithEmbedding()
    with pytest.raises(BoftTargetError) as info:
        get_peft_model(model, BOFTConfig(target_modules=["emb", "lin", "grouped"], boft_block_size=4))
    text = str(info.value)
    assert "emb: layer type torch.nn.modules.sparse.Embedding is not supported" in text
    assert "grouped: Conv2d with groups=2 is not supported" in text
    assert isinstance(model.lin, torch.nn.Linear)


def test_all_linear_is_checked_too(registered):
    from boft_plugin.toy.models import tiny_llama

    with pytest.raises(BoftTargetError, match=r"down_proj \(width 128\)"):
        get_peft_model(tiny_llama(), BOFTConfig(target_modules="all-linear", boft_block_size=0, boft_block_num=48))


def test_resolve_geometry_rules():
    g = resolve_geometry(1376, 4, 0, 4)
    assert (g.block_num, g.effective_block_size, g.effective_block_num, g.param_shape) == (344, 32, 43, (4, 344, 4, 4))
    assert resolve_geometry(64, 0, 8, 3).block_size == 8
    for args in [(64, 4, 4, 1), (64, 0, 0, 1), (64, 4, 0, 0), (64, 4, 0, 7)]:
        with pytest.raises(GeometryError):
            resolve_geometry(*args)
