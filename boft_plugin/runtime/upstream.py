"""Every private name of PEFT, transformers, TRL, accelerate, DeepSpeed, torch and huggingface_hub boft-plugin relies
on, in one place, checked against the pinned versions by ``tests/upstream_facts/test_private_names.py``.

Private means "not promised to stay": a leading underscore, or a module that is not part of the library's documented
surface. Two kinds:

- **imported** (:data:`IMPORTED`): boft-plugin calls them; the code takes them from the accessors below, never with
  its own ``from x import _y``, so an upgrade that removes one fails here, in one place, by name;
- **overridden or read** (:data:`OVERRIDDEN`): methods of upstream classes our subclasses replace or call through
  ``super()``, and attributes read or set on upstream objects; a rename upstream would silently stop the override.

Every accessor imports lazily: importing this module costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = [
    "IMPORTED",
    "OVERRIDDEN",
    "PrivateName",
    "compute_local_shape_and_global_offset",
    "foreach_abs_reciprocal",
    "foreach_max_abs",
    "in_out_features",
    "include_all_linear_layers",
    "is_excluded_match",
    "model_class_for",
    "parse_size_to_int",
    "resolve",
    "target_module_matches",
    "torch_dispatch_mode",
    "unpack_bnb_cpu_weight",
]


@dataclass(frozen=True)
class PrivateName:
    """``module`` + ``qualname`` (``Class.attribute`` for members); ``used_by`` says where and why."""

    module: str
    qualname: str
    used_by: str


IMPORTED = (
    PrivateName(
        "peft.tuners.tuners_utils", "_maybe_include_all_linear_layers", "tuner.targets: 'all-linear' as PEFT expands it"
    ),
    PrivateName(
        "peft.tuners.boft.model", "BOFTModel._check_target_module_exists", "tuner.targets: PEFT's own target matching"
    ),
    PrivateName(
        "peft.tuners.tuners_utils", "_ExcludedModule", "tuner.targets: what the matcher returns for an excluded module"
    ),
    PrivateName(
        "peft.tuners.boft.layer",
        "_FBD_CUDA",
        "stock_peft: PEFT's cached CUDA extension (the oracle's switch); export.verify: did it build",
    ),
    PrivateName(
        "peft.tuners.boft.layer", "FastBlockDiag", "stock_peft: the block-diagonal the oracle replaces on the CPU"
    ),
    PrivateName(
        "transformers.models.auto.auto_factory", "_get_model_class", "recipes.model_source: the class of a config"
    ),
    PrivateName(
        "transformers.initialization", "no_init_weights", "recipes.builder, distributed.zero.loading: empty builds"
    ),
    PrivateName("transformers.modeling_utils", "ContextManagers", "distributed.zero.loading: from_config's contexts"),
    PrivateName("transformers.modeling_utils", "local_torch_dtype", "distributed.zero.loading: from_config's contexts"),
    PrivateName("transformers.modeling_utils", "set_zero3_state", "distributed.zero.loading: from_config's contexts"),
    PrivateName("transformers.monkey_patching", "apply_patches", "distributed.zero.loading: from_config's contexts"),
    PrivateName(
        "transformers.monkey_patching", "patch_output_recorders", "distributed.zero.loading: from_config's contexts"
    ),
    PrivateName("transformers.integrations.deepspeed", "prevent_arange_dtype_change", "distributed.zero.loading"),
    PrivateName("transformers.trainer", "hf_api", "recipes.trainers.push_to_hub: the Trainer's own Hub client"),
    PrivateName("deepspeed.runtime.zero.partition_parameters", "Init._convert_to_deepspeed_param", "zero3_loading"),
    PrivateName(
        "torch.distributed.tensor._utils", "compute_local_shape_and_global_offset", "distributed.fsdp2.loading"
    ),
    PrivateName("huggingface_hub.serialization._base", "parse_size_to_int", "export.safetensors_stream: shard sizes"),
    PrivateName("peft.tuners.tuners_utils", "_get_in_out_features", "tuner.targets: widths of non-nn.Linear layers"),
    PrivateName("torch", "_foreach_norm", "tuner.numerics: one fused max|x| over every adapter tensor"),
    PrivateName("torch", "_foreach_abs", "tuner.numerics: fused 1/|boft_s|"),
    PrivateName("torch", "_foreach_reciprocal", "tuner.numerics: fused 1/|boft_s|"),
    PrivateName("torch.utils._python_dispatch", "TorchDispatchMode", "testing.host_syncs: the dispatch counter"),
    PrivateName(
        "bitsandbytes.functional",
        "_convert_weight_packed_for_cpu_inverse",
        "tuner.quantised: undo bitsandbytes' CPU repacking of a 4-bit weight before dequantising",
    ),
)

OVERRIDDEN = (
    PrivateName("peft.tuners.boft.model", "BOFTModel._get_adapter_state_dict", "tuner.model: every save is checked"),
    PrivateName("peft.tuners.boft.model", "BOFTModel._remap_adapter_state_dict_for_load", "tuner.model: every load"),
    PrivateName("peft.tuners.boft.model", "BOFTModel._prepare_model", "tuner.model: targets checked before any change"),
    PrivateName("peft.tuners.boft.model", "BOFTModel._create_and_replace", "tuner.model: our layer classes"),
    PrivateName("peft.tuners.boft.model", "BOFTModel._create_new_module", "tuner.model: our layer classes"),
    PrivateName("peft.tuners.tuners_utils", "BaseTunerLayer._move_adapter_to_device_of_base_layer", "tuner.layer"),
    PrivateName("transformers.trainer", "Trainer._save_checkpoint", "recipes.trainers: pending/complete markers"),
    PrivateName("transformers.trainer", "Trainer._get_output_dir", "recipes.trainers: where checkpoint-N goes"),
    PrivateName("transformers.trainer", "Trainer._finish_current_push", "recipes.trainers.push_to_hub"),
    PrivateName("transformers.trainer", "Trainer._save_optimizer_and_scheduler", "recipes.trainers: FSDP2 DCP state"),
    PrivateName("transformers.trainer", "Trainer._load_from_checkpoint", "recipes.trainers: FSDP2 DCP state"),
    PrivateName("transformers.trainer", "Trainer._load_optimizer_and_scheduler", "recipes.trainers: FSDP2 DCP state"),
    PrivateName("transformers.trainer", "Trainer._get_train_sampler", "recipes.data_order: world-size-invariant order"),
    PrivateName("transformers.modeling_utils", "PreTrainedModel._init_weights", "distributed.fsdp2.loading: buffers"),
    PrivateName("trl", "DPOTrainer._compute_loss", "recipes.trainers: ZeRO-3 reference pass first"),
    PrivateName("trl", "DPOTrainer.compute_ref_log_probs", "recipes.trainers: ZeRO-3 reference pass first"),
    PrivateName("trl", "KTOTrainer._compute_loss", "recipes.trainers: ZeRO-3 reference pass first"),
    PrivateName("trl", "KTOTrainer.compute_ref_log_probs", "recipes.trainers: ZeRO-3 reference pass first"),
    PrivateName("trl", "GRPOTrainer._generate_single_turn", "recipes.trainers: generation inside Engine.generating"),
    PrivateName("trl", "RLOOTrainer._generate_single_turn", "recipes.trainers: generation inside Engine.generating"),
    PrivateName(
        "trl.generation.vllm_generation", "VLLMGeneration._iter_named_params", "recipes.vllm_sync: the streamed sync"
    ),
    PrivateName(
        "trl.generation.vllm_generation", "VLLMGeneration._fix_param_name_to_vllm", "recipes.vllm_sync: vLLM names"
    ),
    PrivateName(
        "deepspeed.runtime.zero.partition_parameters", "Init._zero_init_param", "zero3_loading: partition only"
    ),
)


def resolve(name: PrivateName):
    """The object ``name`` names (``AttributeError`` / ``ImportError`` when the pinned library no longer has it)."""
    value = importlib.import_module(name.module)
    for part in name.qualname.split("."):
        value = getattr(value, part)
    return value


def include_all_linear_layers(config, model):
    """PEFT's expansion of ``target_modules='all-linear'`` (a copy of ``config``)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(config, model)


def target_module_matches(config, key: str):
    """PEFT's own matcher for a module name (truthy when targeted; see :func:`is_excluded_match`)."""
    from peft.tuners.boft.model import BOFTModel

    return BOFTModel._check_target_module_exists(config, key)


def is_excluded_match(matched) -> bool:
    """Whether a :func:`target_module_matches` result means "excluded by ``exclude_modules``" (PEFT returns a truthy
    ``_ExcludedModule`` marker then)."""
    from peft.tuners.tuners_utils import _ExcludedModule

    return isinstance(matched, _ExcludedModule)


def model_class_for(config, auto_class):
    """The class ``auto_class`` (e.g. ``AutoModelForCausalLM``) builds for ``config``, without building it."""
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, auto_class._model_mapping)


def compute_local_shape_and_global_offset(shape, mesh, placements):
    """This rank's local shape and global offset of a DTensor of ``shape`` over ``mesh`` with ``placements``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as compute

    return compute(shape, mesh, placements)


def in_out_features(module) -> tuple[int | None, int | None]:
    """PEFT's ``(in_features, out_features)`` of a base layer (quantised layers that are not ``nn.Linear`` too)."""
    from peft.tuners.tuners_utils import _get_in_out_features

    return _get_in_out_features(module)


def foreach_max_abs(tensors: list) -> list:
    """``max |t|`` of each tensor, fused (tensors of one device and dtype)."""
    import torch

    return list(torch._foreach_norm(tensors, float("inf")))


def foreach_abs_reciprocal(tensors: list) -> list:
    """``1 / |t|`` of each tensor, fused."""
    import torch

    return list(torch._foreach_reciprocal(torch._foreach_abs(tensors)))


def torch_dispatch_mode() -> type:
    """torch's ``TorchDispatchMode`` base class (sees every aten op a region dispatches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def bnb_cpu_kernel_is_bf16() -> bool:
    """Whether bitsandbytes' 4-bit CPU inference kernel (eval mode, no grad) computes in bf16 on this CPU
    (AVX512-BF16: it repacks the weight and rounds its absmax and the activations to bf16)."""
    from bitsandbytes import functional as bnb_functional

    return bool(bnb_functional.has_avx512bf16())


def unpack_bnb_cpu_weight(data, quant_state):
    """bitsandbytes' inverse of its CPU repacking of a 4-bit weight: ``(packed codes, quant state)``.

    The repacking stores ``absmax`` transposed as ``(in / blocksize, out)`` bf16; bitsandbytes 0.50's inverse
    restores it only for double quantisation and leaves a plain state's ``absmax`` in that layout, which
    ``dequantize_4bit`` then reads in the wrong order (32% off on the test model). Here the plain case is put back
    as the flat float32 ``(out * in / blocksize,)`` vector; the bf16 rounding of the repacking itself stays.
    """
    import torch
    from bitsandbytes import functional as bnb_functional

    nested = getattr(quant_state, "original_nested", quant_state.nested)
    data, quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, quant_state)
    if not nested and quant_state.absmax.dim() == 2:
        quant_state.absmax = quant_state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    return data, quant_state


def parse_size_to_int(size: str) -> int:
    """``"1GB"`` -> bytes, as ``save_pretrained``'s ``max_shard_size`` reads it."""
    from huggingface_hub.serialization._base import parse_size_to_int as parse

    return parse(size)
