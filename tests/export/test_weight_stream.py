"""The merged-weight stream for TRL's vLLM weight sync: equal to ``merge_and_unload()``, the trained model untouched,
and fed to TRL's own ``VLLMGeneration.sync_weights`` in both of its modes (vLLM itself is not installed here, so
the LLM and the server client are recorders with the interface TRL calls). Under every engine the stream is
compared with the merged export in tests/distributed/test_distributed.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def adapted():
    """A tiny Llama with a trained-looking BOFT adapter (random rotations and scales), m = 2."""
    from peft import BOFTConfig, get_peft_model

    import boft_plugin
    from boft_plugin.toy.models import tiny_llama

    boft_plugin.register()
    torch.manual_seed(0)
    base = tiny_llama(seed=1, hidden_size=64, intermediate_size=96)
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules="all-linear", init_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "boft_s" in name:
                param.uniform_(0.8, 1.2)
    return model


def _expected(model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload()
    return {
        k: v for k, v in merged.state_dict().items() if k != "lm_head.weight" or not merged.config.tie_word_embeddings
    }


def test_stream_equals_merge_and_unload_and_leaves_the_model_untouched(adapted):
    from boft_plugin.export.weight_stream import iter_merged_weights

    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    expected = _expected(adapted)
    streamed = {name: tensor.clone() for name, tensor in iter_merged_weights(adapted)}
    assert streamed.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(streamed[key], value, atol=1e-6, rtol=1e-5), key
    changed = [k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [] and not any(layer.merged for layer in _boft_layers(adapted))
    adapted_weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(
        streamed[adapted_weight], before[f"base_model.model.{adapted_weight[:-7]}.base_layer.weight"]
    )


def _boft_layers(model):
    from boft_plugin.tuner.layer import BoftLayer

    return [m for m in model.modules() if isinstance(m, BoftLayer)]


class _RecordingLLM:
    """What TRL's colocate sync calls on vLLM's ``LLM``: ``...model_runner.model.load_weights`` and
    ``reset_prefix_cache``."""

    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.resets = 0
        model = SimpleNamespace(load_weights=lambda pairs: self.loaded.extend((n, t.clone()) for n, t in pairs))
        runner = SimpleNamespace(model=model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )

    def reset_prefix_cache(self):
        self.resets += 1


class _RecordingClient:
    """What TRL's server sync calls on its ``VLLMClient``."""

    def __init__(self):
        self.metadata, self.sent, self.resets = None, [], 0

    def update_named_params(self, metadata, named_params):
        self.metadata = metadata
        self.sent = [(name, tensor.clone()) for name, tensor in named_params]

    def reset_prefix_cache(self):
        self.resets += 1


def _generation(model, mode: str):
    """TRL's ``VLLMGeneration`` made a ``StreamedWeightSync`` by the hook, without starting vLLM."""
    from trl.generation.vllm_generation import VLLMGeneration

    from boft_plugin.recipes.vllm_sync import StreamedWeightSync, stream_weight_sync

    generation = object.__new__(VLLMGeneration)  # its __init__ starts vLLM, which is not installed here
    generation.model, generation.mode, generation.enable_sleep_mode = model, mode, False
    generation.accelerator = SimpleNamespace(is_main_process=True)
    generation._weight_metadata = None
    trainer = SimpleNamespace(vllm_generation=generation)
    assert stream_weight_sync(trainer) and type(generation) is StreamedWeightSync
    assert not stream_weight_sync(SimpleNamespace(vllm_generation=None))  # no vLLM: nothing to do
    return generation


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_trl_sync_weights_pushes_the_streamed_merged_weights(adapted, mode):
    expected = _expected(adapted)
    generation = _generation(adapted, mode)
    if mode == "colocate":
        generation.llm = recorder = _RecordingLLM()
    else:
        generation.vllm_client = recorder = _RecordingClient()
    generation.sync_weights()  # TRL's own method
    pushed = dict(recorder.loaded if mode == "colocate" else recorder.sent)
    assert recorder.resets == 1
    assert pushed.keys() == expected.keys()
    assert all(torch.allclose(pushed[k], v, atol=1e-6, rtol=1e-5) for k, v in expected.items())
    if mode == "server":  # shapes and dtypes announced before the tensors, as the server needs
        assert [(n, d, tuple(s)) for n, d, s in recorder.metadata] == [
            (n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in recorder.sent
        ]
    assert not any(layer.merged for layer in _boft_layers(adapted))
