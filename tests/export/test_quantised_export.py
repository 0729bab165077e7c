"""export_merged from a quantised (bitsandbytes) model: full precision, from the checkpoint the model came from."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model

from boft_plugin import export_merged
from boft_plugin.ops.compare import max_relative_error
from boft_plugin.testing.quantised import bitsandbytes_missing, load_quantised, save_tiny_llama

missing = bitsandbytes_missing()
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("quantised-export") / "tiny-llama")


def adapted(base_dir, mode: str):
    import boft_plugin

    boft_plugin.register()
    try:
        torch.manual_seed(0)
        config = BOFTConfig(
            boft_block_size=4,
            boft_n_butterfly_factor=2,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_weights=False,
        )
        return get_peft_model(load_quantised(base_dir, mode), config)
    finally:
        boft_plugin.unregister()


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def plain_logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()(input_ids=IDS).logits


@pytest.mark.parametrize("mode", ["nf4-double-bf16", "int8"])
def test_merged_export_of_a_quantised_run_merges_into_the_full_precision_checkpoint(base_dir, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    model = adapted(base_dir, mode)
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the checkpoint is found: no "dequantised" warning
        export_merged(model, tmp_path / "merged")

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = plain_logits(tmp_path / "merged")
    # the same adapter on the full-precision base, through PEFT (our tuner): what "ship in full precision" means
    import boft_plugin

    boft_plugin.register()
    try:
        full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
        with torch.no_grad():
            expected = full(input_ids=IDS).logits
    finally:
        boft_plugin.unregister()
    assert max_relative_error(merged, expected) < 1e-5
    with torch.no_grad():
        quantised = model(input_ids=IDS).logits
    assert max_relative_error(merged, quantised) > 1e-3  # not the 4-bit / 8-bit rounding of the weights


def test_without_a_full_precision_checkpoint_it_merges_the_dequantised_weights_and_says_so(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import boft_plugin
    from boft_plugin.export.quantised_source import quantised_modules
    from boft_plugin.tuner.layer import BoftLayer
    from boft_plugin.tuner.quantised import dequantise, dequantised_weight, quantisation_backend

    model = adapted(base_dir, "nf4")
    model.get_base_model().name_or_path = str(tmp_path / "moved-away")
    model.get_base_model().config._name_or_path = str(tmp_path / "moved-away")
    with pytest.warns(UserWarning, match="dequantised weights"):
        export_merged(model, tmp_path / "merged")
    # the exact reference: the same adapter, in float32, on a float32 model holding the dequantised weights (the
    # quantised model's own forward is no 1e-4 reference: bitsandbytes' CPU 4-bit kernel computes in bf16 on CPUs
    # with AVX512-BF16, measured 3.6e-3 from the dequantised float32 matmul)
    model.save_pretrained(tmp_path / "adapter")
    dequantised = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module, base in quantised_modules(model.get_base_model()):
            weight = (
                dequantised_weight(module)
                if isinstance(module, BoftLayer)
                else dequantise(base, quantisation_backend(base))
            )
            dequantised.get_submodule(name).weight.copy_(weight.float())
    boft_plugin.register()
    try:
        reference = PeftModel.from_pretrained(dequantised, tmp_path / "adapter").eval()
        with torch.no_grad():
            expected = reference(input_ids=IDS).logits
            quantised = model(input_ids=IDS).logits
    finally:
        boft_plugin.unregister()
    merged = plain_logits(tmp_path / "merged")
    assert max_relative_error(merged, expected) < 1e-5
    assert max_relative_error(merged, quantised) < 2e-2  # within the quantised kernel's own rounding
