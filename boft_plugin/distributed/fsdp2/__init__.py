"""FSDP2 (``fully_shard``) for BOFT-adapted models, without a whole copy of the base model on any rank.

- :mod:`.shard`: block-axis placement of ``boft_R``, the right order (adapter first, then shard), the mesh on this
  rank's device (HSDP: replicate across nodes, shard within), float32 adapter units under bf16 mixed precision;
- :mod:`.loading`: meta-device model -> adapter(s) -> shard -> each rank reads its slices from safetensors onto the
  mesh's device;
- :mod:`.checkpoints`: Trainer checkpoints through ``torch.distributed.checkpoint`` (resharded on load);
- :mod:`.generation`: ``generate`` on the sharded model (GRPO / RLOO), the ranks kept in step.

:class:`FSDP2Engine` is the recipes' route (``fsdp2_pre_shard``): the model is sharded before the Trainer sees it.
"""

from __future__ import annotations

import copy

from ..checkpoint_files import has_safetensors
from ..engine import AdapterRequest, BaseModelSpec, Engine
from . import checkpoints
from .generation import mark_fsdp_managed, sharded_generation
from .loading import copy_adapter_shards, load_adapter_shards, load_sharded_base_weights
from .shard import device_mesh, is_fsdp2_sharded, packed_4bit_layers, shard_for_fsdp2, store_block_major

__all__ = [
    "FSDP2Engine",
    "device_mesh",
    "is_fsdp2_sharded",
    "load_sharded_base_weights",
    "shard_for_fsdp2",
    "store_block_major",
]


class FSDP2Engine(Engine):
    """Shards before the trainer: ``mp_dtype`` (bf16/fp16 or None) computes the base in that dtype (FSDP2's
    ``MixedPrecisionPolicy``, float32 gradient reduction) with float32 adapter units; ``replicas`` > 1 is HSDP."""

    name = "fsdp2"
    shards_model = True

    def __init__(self, mp_dtype=None, replicas: int = 1, log=None):
        self.mp_dtype, self.replicas = mp_dtype, replicas
        self._log = log or (lambda message: None)
        self._from_shards = False

    def load_base(self, spec: BaseModelSpec):
        """A local safetensors checkpoint: the model on the meta device (each rank reads its slices in
        :meth:`adapt`); otherwise (a hub id, or a base quantised while it loads) ``from_pretrained`` whole, sharded
        in :meth:`adapt`.

        A 4-bit base is quantised by bitsandbytes as it loads, on this rank's device: each rank holds the whole
        packed model (1/4 of its bf16 bytes) until :meth:`adapt` shards it, then ~1/W of it.
        """
        self._spec = spec
        quantised = spec.from_pretrained_kwargs.get("quantization_config") is not None
        self._from_shards = has_safetensors(spec.path) and not quantised
        if not self._from_shards:
            return super().load_base(spec)
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        kwargs = {"dtype": spec.dtype}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        with torch.device("meta"), no_init_weights():  # every weight is read from the checkpoint next
            model = AutoModelForCausalLM.from_config(spec.config, trust_remote_code=spec.trust_remote_code, **kwargs)
        model.tie_weights()  # skipped under no_init_weights: an untied lm_head would be missing from a tied checkpoint
        model.name_or_path = model.config._name_or_path = spec.path  # what the exported adapter names as its base
        return model

    def policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        reduce = torch.float32 if self.mp_dtype is not None else None
        return MixedPrecisionPolicy(param_dtype=self.mp_dtype, reduce_dtype=reduce)

    def adapt(self, model, request: AdapterRequest):
        """Adapter(s) first (the reference copy too: FSDP2 cannot manage adapters added later), then shard, then each
        rank's slices of the base and of an init adapter."""
        from peft import get_peft_model

        config = copy.copy(request.peft_config)
        config.inference_mode = False  # an init_adapter's saved config says inference
        if self._from_shards or request.init_adapter is None:
            model = get_peft_model(model, config)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, request.init_adapter, is_trainable=True)
        if request.reference is not None:
            model.add_adapter(request.reference, model.peft_config["default"])
            if not self._from_shards:  # real, still unsharded tensors; meta ones are copied once loaded
                copy_adapter_shards(model, "default", request.reference)
        mesh = device_mesh(self.replicas)
        self._log(f"FSDP2 mesh {tuple(mesh.shape)} {mesh.mesh_dim_names} on {mesh.device_type}")
        packed = len(packed_4bit_layers(model))
        shard_for_fsdp2(model, mesh=mesh, mp_policy=self.policy())
        if packed:
            left = len(packed_4bit_layers(model))  # a sharded layer's weight is a DTensor, no longer Params4bit
            self._log(f"FSDP2: {packed - left} of {packed} 4-bit layers sharded, each its own unit")
        if self._from_shards:
            report = load_sharded_base_weights(model, self._spec.path)  # also initialises the adapters
            self._log(
                f"FSDP2: {len(report.loaded)} tensors read shard by shard from {self._spec.path} "
                f"({report.local_bytes / 2**30:.2f} GiB on this rank, {report.seconds:.1f} s)"
            )
            if request.read_init_tensors is not None:
                load_adapter_shards(model, request.read_init_tensors())
            if request.reference is not None:
                copy_adapter_shards(model, "default", request.reference)
        model._is_accelerate_prepared = True  # accelerate's own marker: prepare_model returns such a model as it is
        mark_fsdp_managed(model)
        return model, None

    def generating(self, model):
        from ..gather import unwrap_peft_model

        return sharded_generation(unwrap_peft_model(model))

    def save_state(self, trainer, output_dir: str) -> bool:
        checkpoints.save_sharded_state(trainer, output_dir)
        return True

    def load_state(self, trainer, checkpoint: str) -> bool:
        if checkpoint is not None:
            checkpoints.load_sharded_state(trainer, checkpoint)
        return True
