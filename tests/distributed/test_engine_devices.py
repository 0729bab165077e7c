"""Device and precision rules of the engine homes, proven on the CPU (docs/architecture.md, "Engines").

- the FSDP2 loader materialises on the device of the model's mesh (what FSDP2 all-gathers on), never a default;
- a stray tensor after loading is named;
- under FSDP2 bf16 mixed precision the adapter's forward sees float32 ``boft_R`` / ``boft_s`` while the base
  computes in bf16; under ZeRO-3 the engine makes TRL's bf16 adapters (``autocast_adapter_dtype=False``) float32;
- nothing in the engine homes names a backend, or a device other than the CPU fallback and host-side reads.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import BOFTConfig, get_peft_model

from boft_plugin.distributed import engine
from boft_plugin.distributed.fsdp2 import loading, shard_for_fsdp2
from boft_plugin.testing.paths import REPO
from boft_plugin.toy.models import tiny_llama

CONFIG = dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj", "down_proj"])


def _meta_adapted():
    with torch.device("meta"):
        model = tiny_llama(seed=0)
    return get_peft_model(model, BOFTConfig(**CONFIG))


def test_fsdp2_loader_takes_the_mesh_device(registered, one_rank_group, tmp_path, monkeypatch):
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    model = _meta_adapted()
    shard_for_fsdp2(model)
    assert loading.mesh_device(model) == torch.device("cpu")  # the gloo mesh's device type

    class Stop(Exception):
        pass

    seen = []

    def to_empty(*, device, recurse=True):
        seen.append(torch.device(device))
        raise Stop

    other = torch.device("meta")  # stands for an accelerator's mesh: anything but the CPU default
    monkeypatch.setattr(loading, "mesh_device", lambda _model: other)
    monkeypatch.setattr(model, "to_empty", to_empty)
    with pytest.raises(Stop):
        loading.load_sharded_base_weights(model, str(tmp_path / "base"))
    assert seen == [other]


def test_check_placement_names_the_stray_tensor():
    model = tiny_llama(seed=0)
    engine.check_placement(model, torch.device("cpu"))
    model.lm_head.to("meta")
    with pytest.raises(RuntimeError, match=r"lm_head\.weight is on meta"):
        engine.check_placement(model, torch.device("cpu"))


def _forward_dtypes(float32_adapters: bool) -> tuple[set, set]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from boft_plugin.tuner.layer import BoftLayer

    model = get_peft_model(tiny_llama(seed=0), BOFTConfig(**CONFIG))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_for_fsdp2(model, mp_policy=policy, float32_adapters=float32_adapters)
    adapter, base = set(), set()
    for layer in (m for m in model.modules() if isinstance(m, BoftLayer)):
        layer.register_forward_pre_hook(
            lambda mod, _: adapter.update({mod.boft_R["default"].dtype, mod.boft_s["default"].dtype})
        )
        layer.get_base_layer().register_forward_pre_hook(lambda mod, _: base.add(mod.weight.dtype))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.float().sum().backward()
    return adapter, base


def test_fsdp2_bf16_forward_sees_float32_adapters(registered, one_rank_group):
    adapter, base = _forward_dtypes(float32_adapters=True)
    assert adapter == {torch.float32} and base == {torch.bfloat16}
    adapter, _ = _forward_dtypes(float32_adapters=False)  # the whole block in param_dtype: what the default avoids
    assert adapter == {torch.bfloat16}


def test_zero3_makes_trl_bf16_adapters_float32(registered):
    from boft_plugin.distributed.zero import ZeroEngine

    model = tiny_llama(seed=0).to(torch.bfloat16)
    peft_model = get_peft_model(model, BOFTConfig(**CONFIG), autocast_adapter_dtype=False)  # TRL under ZeRO-3
    dtypes = lambda: {p.dtype for n, p in peft_model.named_parameters() if "boft_" in n}  # noqa: E731
    assert dtypes() == {torch.bfloat16}  # PEFT's own behaviour (its suite checks it)
    ZeroEngine(3).after_wrap(peft_model)
    assert dtypes() == {torch.float32}
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "boft_" in n)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    assert peft_model(input_ids=ids).logits.dtype == torch.bfloat16  # rounded once to the base's dtype


ENGINE_HOMES = ["boft_plugin/distributed", "boft_plugin/tuner/zero3.py"]
ALLOWED = {  # the CPU fallback of rank_device / mesh_device, and host-side reads of safetensors files
    ("engine.py", 'return torch.device("cpu")'),
    ("loading.py", 'if mesh.device_type == "cpu":'),
    ("loading.py", 'return torch.device("cpu")'),
    ("loading.py", 'safe_open(file, framework="pt", device="cpu")'),
}


def test_engine_homes_name_no_backend_and_no_default_device():
    pattern = re.compile(r"""["'](gloo|nccl|cpu|cuda)["']""")
    found = []
    for home in ENGINE_HOMES:
        path = REPO / home
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for number, line in enumerate(file.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and not any(file.name == name and snippet in code for name, snippet in ALLOWED):
                    found.append(f"{file.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
