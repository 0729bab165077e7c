"""DeepSpeed ZeRO-1/2/3: the base partitioned without a whole copy anywhere (ZeRO-3), universal-format resume on
another number of ranks, and the engine's gathered parameters released before an export.

- :mod:`.loading`: ZeRO-3 builds the model empty under ``zero.Init`` and every rank reads its own partitions;
- :mod:`.checkpoints`: DeepSpeed's universal checkpoint format for resuming on another world size;
- :mod:`.quantised`: a bitsandbytes base under ZeRO-3 (loaded quantised on each rank, partitioned by the engine);
- precision: the recipes turn ``bf16: true`` into DeepSpeed's ``torch_autocast`` (``recipes.deepspeed_precision``),
  so the parameters, the BOFT adapter and the Trainer's checkpoints stay float32 and only the linear layers'
  weights travel in bf16 (docs/numerics.md, "Engines and bf16").
"""

from __future__ import annotations

import os

from ..checkpoint_files import has_safetensors
from ..engine import AdapterRequest, BaseModelSpec, Engine, check_placement, float32_adapters
from .checkpoints import prepare_universal_resume

__all__ = ["ZeroEngine"]


class ZeroEngine(Engine):
    def __init__(self, stage: int, log=None):
        self.stage = stage
        self.name = "zero3" if stage == 3 else "zero2"
        self._quantised = False  # a bitsandbytes base (ZeRO-3 partitions it only once the engine starts)
        self._log = log or (lambda message: None)

    def after_wrap(self, model) -> None:
        """TRL adds the adapter with ``autocast_adapter_dtype=False`` under ZeRO-3: on a bf16 base it would be bf16."""
        changed = float32_adapters(model)
        if changed:
            self._log(
                f"ZeRO-3: {changed} half-precision BOFT tensors made float32 (TRL's autocast_adapter_dtype=False)"
            )

    def load_base(self, spec: BaseModelSpec):
        """ZeRO-3 and a local safetensors checkpoint: built empty and partitioned, every rank reads its partitions
        (on DeepSpeed's device for this rank); otherwise ``from_pretrained`` (under ``zero.Init`` for ZeRO-3)."""
        if self.stage == 3 and spec.from_pretrained_kwargs.get("quantization_config") is not None:
            return self._load_quantised_for_zero3(spec)
        if self.stage != 3 or not has_safetensors(spec.path):
            return super().load_base(spec)
        from transformers import GenerationConfig

        from .loading import empty_zero3_model, load_zero3_partitions

        model = empty_zero3_model(spec.model_class, spec.config, spec.dtype, spec.attn_implementation)
        model.name_or_path = model.config._name_or_path = spec.path
        report = load_zero3_partitions(model, spec.path)
        if report is None:
            self._log(f"ZeRO-3: {spec.path} needs transformers' key conversions; loading it with from_pretrained")
            return super().load_base(spec)
        self._log(
            f"ZeRO-3: {report['tensors']} tensors read partition by partition from {spec.path} "
            f"({report['local_gib']:.2f} GiB on this rank, {report['seconds']:.1f} s)"
        )
        import torch
        from deepspeed.accelerator import get_accelerator

        check_placement(model, torch.device(get_accelerator().current_device_name()))
        if os.path.isfile(os.path.join(spec.path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(spec.path)
        return model.eval()  # as from_pretrained returns it

    def quantised_device_map(self) -> dict | None:
        """None under ZeRO-3 (transformers refuses a ``device_map`` there): bitsandbytes quantises onto the current
        device, set here to this rank's."""
        if self.stage != 3:
            return super().quantised_device_map()
        self.device()
        return None

    def _load_quantised_for_zero3(self, spec: BaseModelSpec):
        import torch
        from deepspeed.accelerator import get_accelerator

        self._quantised = True
        model = super().load_base(spec)  # quantised whole on this rank (no zero.Init for quantised models)
        check_placement(model, torch.device(get_accelerator().current_device_name()))
        self._log(f"ZeRO-3: {spec.path} loaded quantised on this rank; DeepSpeed partitions it as the engine starts")
        return model

    def trainer_callbacks(self) -> list:
        if not self._quantised:
            return []
        from .quantised import ReportQuantisedPartition

        return [ReportQuantisedPartition(self._log)]

    def adapt(self, model, request: AdapterRequest):
        if request.init_adapter is None:
            return model, request.peft_config
        from peft import PeftModel

        # TRL's own ZeRO-3 route: no upcast by PEFT of a bf16 base's adapter (after_wrap makes it float32)
        model = PeftModel.from_pretrained(
            model, request.init_adapter, is_trainable=True, autocast_adapter_dtype=self.stage != 3
        )
        return model, None

    def prepare_resume(self, trainer, checkpoint, written_by, after_convert=None) -> None:
        prepare_universal_resume(trainer, checkpoint, written_by, after_convert)

    def release(self, trainer) -> None:
        """Wait for and release every ZeRO-3 parameter still gathered or in flight (prefetched by an engine).

        After DPO with precomputed reference log-probs TRL keeps a second (inference) DeepSpeed engine on the same
        model; a parameter it prefetched can still be in flight, and gathering it for export then fails with
        "Cannot partition a param in flight".
        """
        engines = [getattr(trainer, "model_wrapped", None), getattr(trainer, "_precompute_engine", None)]
        seen = set()
        for engine in engines:
            if engine is None or id(engine) in seen or not hasattr(engine, "empty_partition_cache"):
                continue
            seen.add(id(engine))
            engine.empty_partition_cache()
