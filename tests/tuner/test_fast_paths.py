"""The speed/memory machinery keeps the maths: grouped blocks, checkpointed composition, eval cache,
the output-saving scale, torch.compile without graph breaks, gradient checkpointing."""

import copy

import pytest
import torch
from peft import BOFTConfig, get_peft_model

import boft_plugin
from boft_plugin.ops import butterfly as ops
from boft_plugin.toy.models import tiny_llama
from boft_plugin.tuner.rotation import application_blocks, effective_blocks_from


def _layer_model(width=64, out=48, bias=True, **kw):
    torch.manual_seed(0)
    config = dict(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
    config.update(kw)
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(width, out, bias=bias)), BOFTConfig(**config))


@pytest.mark.parametrize("factors,min_width", [(1, 16), (2, 16), (3, 64), (2, 4)])
def test_grouped_application_blocks_are_the_same_rotation(factors, min_width):
    boft_r = 0.2 * torch.randn(factors, 32, 4, 4, dtype=torch.float64)
    grouped = application_blocks(boft_r, 0.0, min_width)
    effective = effective_blocks_from(boft_r)
    assert grouped.shape[-1] >= min(min_width, 128) or grouped.shape[0] == 1
    assert torch.equal(torch.block_diag(*grouped), torch.block_diag(*effective))


def test_layer_saves_no_tokens_by_out_tensor_besides_its_output(registered):
    tokens, width, out = 256, 64, 512
    model = _layer_model(width=width, out=out)
    x = torch.randn(tokens, width, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    storages.pop(x.untyped_storage().data_ptr(), None)  # the input: needed for the rotation's gradient
    storages.pop(y.untyped_storage().data_ptr(), None)  # the output: usually saved by the next op anyway
    for param in model.parameters():  # the frozen weight (for the input gradient) and the adapter
        storages.pop(param.untyped_storage().data_ptr(), None)
    assert sum(storages.values()) < 0.1 * tokens * out * 4, storages


def test_eval_cache_is_reused_and_invalidated(registered):
    model = _layer_model().eval()
    layer = model.base_model.model[0]
    x = torch.randn(4, 64)
    with torch.no_grad():
        first = model(x)
        blocks = layer.application_blocks("default", torch.float32)
        assert layer.application_blocks("default", torch.float32) is blocks
        layer.boft_R["default"].add_(0.1 * torch.randn_like(layer.boft_R["default"]))  # as an optimizer step does
        assert layer.application_blocks("default", torch.float32) is not blocks
        second = model(x)
    assert not torch.allclose(first, second)
    reference = copy.deepcopy(model)
    reference.base_model.model[0]._boft_block_cache.clear()
    with torch.no_grad():
        assert torch.allclose(reference(x), second)


def test_torch_compile_full_graph_forward_and_backward(registered):
    model = _layer_model(boft_n_butterfly_factor=3)
    layer = model.base_model.model[0]
    x = torch.randn(2, 7, 64, requires_grad=True)
    eager = layer(x)
    eager.square().sum().backward()
    grads = (x.grad.clone(), layer.boft_R["default"].grad.clone(), layer.boft_s["default"].grad.clone())
    for p in (x, layer.boft_R["default"], layer.boft_s["default"]):
        p.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x)
    out.square().sum().backward()
    assert torch.allclose(out, eager, atol=1e-6)
    new = (x.grad, layer.boft_R["default"].grad, layer.boft_s["default"].grad)
    for a, b in zip(new, grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(registered):
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_llama(),
            BOFTConfig(target_modules="all-linear", boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False),
        )
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_eval_cache_survives_no_version_bump_updates(registered):
    """Fused optimizers update parameters without bumping the version counter: a training forward or a mode
    switch must drop the cache."""
    model = _layer_model().eval()
    layer = model.base_model.model[0]
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
    model.train()
    model(x).sum().backward()
    with torch.no_grad():
        layer.boft_R["default"].data.add_(0.1 * torch.randn_like(layer.boft_R["default"]))  # no version bump
    model.eval()
    with torch.no_grad():
        after = model(x)
        layer._boft_block_cache.clear()
        fresh = model(x)
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh)


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_inference_mode_first_then_training(registered, factors, monkeypatch):
    """A first forward under ``torch.inference_mode`` (``generate``, PEFT's merge tests) must not poison what the
    next training step reuses: module-level caches hold no inference tensors."""
    monkeypatch.setattr(ops, "_POSITIONS", {})  # so this process builds the index tensors under inference mode
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(64, 32)),
        BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False),
    )
    x = torch.randn(8, 64)
    with torch.inference_mode():
        before = model(x)
    model.train()
    out = model(x)
    out.square().sum().backward()
    grad = model.base_model.model[0].boft_R["default"].grad
    assert grad is not None and grad.abs().sum() > 0
    assert torch.allclose(out.detach(), before, atol=1e-5)


def test_huge_but_finite_boft_r_is_not_reported_as_nan():
    boft_plugin.register()
    try:
        model = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(32, 16)),
            BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2),
        )
    finally:
        boft_plugin.unregister()
    with torch.no_grad():
        model.base_model.model[0].boft_R["default"].fill_(1e37)  # sum overflows float32, every entry is finite
    out = model(torch.randn(3, 32))
    assert torch.isfinite(out).all()
    boft_plugin.check_numerics(model)  # max |entry|, not a sum: no overflow, no error
