"""The hot path: no host synchronisation in forward + backward (any m, dropout on or off, training and eval), one
host read per optimizer step (the numerics guard), a whole adapted model compiled with ``fullgraph=True`` by
inductor with eager's loss and gradients, the guard working under compile, and autocast output dtypes as LoRA's."""

from __future__ import annotations

import pytest
import torch
from peft import BOFTConfig, LoraConfig, get_peft_model

import boft_plugin
from boft_plugin.testing.host_syncs import count_host_syncs
from boft_plugin.toy.models import tiny_llama

pytestmark = pytest.mark.timeout(600)

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _adapted(factors: int, dropout: float = 0.0, layers: int = 2, **config):
    torch.manual_seed(0)
    config = dict(
        target_modules="all-linear",
        boft_block_size=8,
        boft_n_butterfly_factor=factors,
        boft_dropout=dropout,
        init_weights=False,
        **config,
    )
    return get_peft_model(tiny_llama(num_hidden_layers=layers), BOFTConfig(**config))


def _loss(model, ids=IDS):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("tokens", [16, 128], ids=["recomputed-composition", "kept-composition"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("factors", [1, 2, 4])
def test_no_host_sync_in_forward_and_backward(registered, factors, dropout, tokens):
    model = _adapted(factors, dropout).train()
    ids = torch.randint(0, 256, (1, tokens))
    _loss(model, ids).backward()  # first step: lazily built caches are not the hot path
    with count_host_syncs() as training:
        _loss(model, ids).backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        with count_host_syncs() as evaluation:
            model(input_ids=ids)
    assert training.total == 0, dict(training.counts)
    assert evaluation.total == 0, dict(evaluation.counts)


def test_the_counter_sees_what_stock_peft_and_a_host_read_do(registered):
    """The counter is not blind: stock PEFT's BOFT (linalg.solve's error check) and .item() are counted."""
    with boft_plugin.stock_peft_boft(multi_factor=False):
        torch.manual_seed(0)
        stock = get_peft_model(tiny_llama(), BOFTConfig(target_modules=["q_proj"], boft_block_size=8))
        with count_host_syncs() as counter:
            _loss(stock).backward()
            _loss(stock).item()
    assert counter.counts["_local_scalar_dense"] >= 1
    assert counter.total >= 3, dict(counter.counts)  # 2 adapted layers + the .item()


def _count_steps(model, fused: bool, steps: int = 3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=fused)
    for counting in (False, True):
        with count_host_syncs() as counter:
            for _ in range(steps if counting else 2):
                _loss(model).backward()
                optimizer.step()
                optimizer.zero_grad()
    return counter.counts


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-adamw", "fused-adamw"])
def test_one_host_read_per_optimizer_step_more_than_lora(registered, fused):
    model = _adapted(4, 0.1).train()
    ours = _count_steps(model, fused)
    torch.manual_seed(0)
    lora = _count_steps(get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", r=4)).train(), fused)
    assert ours - lora == {"tolist": 3} and lora - ours == {}  # the guard's one read per step, nothing else
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scale_is_large(["default"])  # the guard left the hint that lets backward keep no extra tensor


def test_a_changed_scale_voids_the_hint_until_the_next_check(registered):
    model = _adapted(2)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer.scale_is_large(["default"])
    with torch.no_grad():
        layer.boft_s["default"][5] = 0.0  # in place: the hint recorded for the old values no longer holds
    assert not layer.scale_is_large(["default"])
    boft_plugin.check_numerics(model)  # the guard finds the small scale and keeps exact r for it
    assert not layer.scale_is_large(["default"])
    with torch.no_grad():
        layer.boft_s["default"].fill_(1.0)
    boft_plugin.check_numerics(model)
    assert layer.scale_is_large(["default"])


def test_inductor_compiles_the_whole_adapted_model_with_eager_loss_and_gradients(registered):
    model = _adapted(2, layers=1).train()
    inner = model.base_model.model  # the transformers model with the BOFT layers in it

    def step(forward):
        for param in model.parameters():
            param.grad = None
        loss = _loss(forward)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step(inner)
    torch._dynamo.reset()
    compiled = torch.compile(inner, fullgraph=True)  # inductor; fullgraph: any graph break raises
    compiled_loss, compiled_grads = step(compiled)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 14
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_the_guard_still_fires_when_the_model_is_compiled(registered):
    model = _adapted(4, dropout=0.1, layers=1).train()  # dropout too: its draws stay inside the graph
    compiled = torch.compile(model.base_model.model, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _loss(compiled).backward()
    optimizer.step()
    _loss(compiled).backward()
    with torch.no_grad():  # as a diverged update would leave it
        model.base_model.model.model.layers[0].mlp.gate_proj.boft_R["default"][0, 0, 1, 2] = float("nan")
    message = r"of 1 layer\(s\).*\n  - layer model\.layers\.0\.mlp\.gate_proj, adapter 'default': boft_R has 1 NaN"
    with pytest.raises(boft_plugin.BoftNumericsError, match=message):
        optimizer.step()


def test_the_guard_can_be_switched_off(registered, monkeypatch):
    monkeypatch.setenv("BOFT_PLUGIN_NUMERICS_GUARD", "0")
    model = _adapted(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model).backward()
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.down_proj.boft_s["default"][0] = float("inf")
    optimizer.step()  # no error: the user asked for no guard
    with pytest.raises(boft_plugin.BoftNumericsError):
        boft_plugin.check_numerics(model)  # an explicit check still checks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype_is_the_base_layers_as_with_lora(registered, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    base = torch.nn.Sequential(torch.nn.Linear(64, 32))
    ours = get_peft_model(base, BOFTConfig(target_modules=["0"], boft_block_size=8, boft_n_butterfly_factor=2))
    lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 32)), LoraConfig(target_modules=["0"], r=4))
    with torch.autocast("cpu", dtype=dtype):
        expected = torch.nn.Linear(64, 32)(x).dtype
        assert ours(x).dtype == lora(x).dtype == expected == dtype
    assert ours(x).dtype == torch.float32  # no autocast: the input's dtype


def test_training_steps_after_the_first_do_not_recompile(registered, monkeypatch):
    """The guard refreshes each layer's scale hint every step; a compiled graph must not guard on anything that
    changes per step (parameter versions), or every step would recompile. Compiled cold (no eager forward first):
    the recomputed composition must not fill a module-level cache inside the checkpointed region."""
    from boft_plugin.ops import butterfly

    monkeypatch.setattr(butterfly, "_POSITIONS", {})
    model = _adapted(2, layers=1).train()
    compiled = torch.compile(model.base_model.model, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _loss(compiled).backward()
    optimizer.step()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for _ in range(3):
        optimizer.zero_grad()
        _loss(compiled).backward()
        optimizer.step()
