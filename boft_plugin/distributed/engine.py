"""One small interface per engine: where this rank's part of the model lives, and how checkpoints and exports see it.

Every engine (:mod:`.replicated` for one process and DDP, :mod:`.zero` for DeepSpeed ZeRO-1/2/3, :mod:`.fsdp2`)
answers the same questions, so the recipes' builder and trainer never branch on the engine themselves:

- :meth:`Engine.device`: this rank's device (the accelerator at ``LOCAL_RANK``, made current; else the CPU);
- :meth:`Engine.load_base`: this rank's base model, whole, partitioned (ZeRO-3) or on the meta device (FSDP2);
- :meth:`Engine.adapt`: the adapter(s) on it, and sharding where the engine shards before the trainer sees the model;
- trainer hooks: :meth:`Engine.save_state` / :meth:`Engine.load_state` (checkpoints in the engine's own format),
  :meth:`Engine.prepare_resume` (a checkpoint written by another number of ranks), :meth:`Engine.release` (what the
  engine still holds gathered, before an export gathers).

Device rule: every tensor an engine creates or loads goes to :meth:`Engine.device` (or, for a sharded model, to the
device of its mesh); nothing here names a device or a backend except the CPU fallback of :func:`rank_device`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..runtime.ranks import local_rank

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["AdapterRequest", "BaseModelSpec", "Engine", "check_placement", "float32_adapters", "rank_device"]


def rank_device() -> torch.device:
    """This rank's device: the accelerator numbered ``LOCAL_RANK`` (set as the current device, which NCCL and the
    object collectives need), or the CPU on a machine without one."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None:
        return torch.device("cpu")
    index = local_rank() % max(1, torch.accelerator.device_count())
    torch.accelerator.set_device_index(index)
    return torch.device(accelerator.type, index)


def check_placement(model: nn.Module, device: torch.device) -> None:
    """Raise ``RuntimeError`` naming the first parameter or buffer that is not on ``device`` (its local shard)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else getattr(tensor, "ds_tensor", tensor)
        if local.device.type != device.type or (device.index is not None and local.device.index != device.index):
            raise RuntimeError(f"{name} is on {local.device}, this rank's device is {device}")


def float32_adapters(model: nn.Module) -> int:
    """Make every bf16/fp16 ``boft_R`` / ``boft_s`` a float32 parameter, in place; returns how many changed.

    PEFT gives a new adapter the base weight's dtype and brings it back to float32 only with
    ``autocast_adapter_dtype=True``, which TRL turns off under ZeRO-3; a bf16 ``boft_s`` cannot move by less than
    2**-8 (``bf16(1 + 3.9e-3) == 1``). Call before the optimizer is built.
    """
    changed = 0
    for module in model.modules():
        for attribute in ("boft_R", "boft_s"):
            parameters = getattr(module, attribute, None)
            if not isinstance(parameters, nn.ParameterDict):
                continue
            for name, tensor in list(parameters.items()):
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    parameters[name] = nn.Parameter(tensor.float(), requires_grad=tensor.requires_grad)
                    changed += 1
    return changed


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model a rank builds: its checkpoint, config and class, and how to load it."""

    path: str
    config: Any  # transformers PretrainedConfig
    model_class: type
    dtype: torch.dtype
    from_pretrained_kwargs: dict = field(default_factory=dict)  # revision, attn_implementation, dtype, ...
    trust_remote_code: bool = False

    @property
    def attn_implementation(self) -> str | None:
        return self.from_pretrained_kwargs.get("attn_implementation")


@dataclass
class AdapterRequest:
    """The adapter(s) a run trains: a new one from ``peft_config``, or ``init_adapter`` continued."""

    peft_config: Any  # peft.BOFTConfig (the init adapter's own config when continuing one)
    init_adapter: str | None = None
    read_init_tensors: Callable[[], dict] | None = None  # the init adapter's checked tensors (for sharded loads)
    reference: str | None = None  # a frozen copy of the adapter to add now (DPO when adapters cannot come later)


class Engine:
    """The interface (see the module docstring); subclasses fill in what differs."""

    name = "single"
    shards_model = False  # the model is sharded before the trainer sees it (the Trainer must not wrap it)

    def device(self) -> torch.device:
        return rank_device()

    def load_base(self, spec: BaseModelSpec) -> nn.Module:
        """The whole base model with ``from_pretrained`` (the trainer moves it to :meth:`device`).

        A quantised base (``quantization_config``) is quantised while it loads, straight onto this rank's device:
        bitsandbytes models cannot be moved afterwards.
        """
        from transformers import AutoModelForCausalLM

        kwargs = dict(spec.from_pretrained_kwargs)
        if kwargs.get("quantization_config") is not None:
            device_map = self.quantised_device_map()
            if device_map is not None:
                kwargs.setdefault("device_map", device_map)
        return AutoModelForCausalLM.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code, **kwargs)

    def quantised_device_map(self) -> dict | None:
        """Where ``from_pretrained`` puts a quantised base: this rank's device (None: no ``device_map``, so
        bitsandbytes uses the current device)."""
        return {"": self.device()}

    def adapt(self, model: nn.Module, request: AdapterRequest) -> tuple[nn.Module, Any]:
        """``(model, peft_config)``: a new adapter is left to the trainer (TRL wraps the model with the config); an
        init adapter is loaded trainable here and the config is None."""
        if request.init_adapter is None:
            return model, request.peft_config
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, request.init_adapter, is_trainable=True)
        return model, None

    def after_wrap(self, model: nn.Module) -> None:
        """The trainer has wrapped the model (TRL added the adapter); nothing is prepared yet."""

    def trainer_callbacks(self) -> list:
        """Trainer callbacks the engine needs (added by the recipes' trainers)."""
        return []

    def generating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Around one ``generate`` of the trained model (GRPO / RLOO): what the engine must hold gathered for it."""
        return contextlib.nullcontext()

    def save_state(self, trainer, output_dir: str) -> bool:
        """Write the trainer's model and optimizer state in the engine's format; False: the Trainer's own."""
        return False

    def load_state(self, trainer, checkpoint: str) -> bool:
        """Load what :meth:`save_state` wrote; False: the Trainer's own."""
        return False

    def prepare_resume(self, trainer, checkpoint: str | None, written_by: int | None, after_convert=None) -> None:
        """Make ``checkpoint`` (written by ``written_by`` ranks) loadable on this world size."""

    def release(self, trainer) -> None:
        """Release what the engine still holds gathered or in flight (before an export gathers)."""
