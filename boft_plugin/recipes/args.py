"""The recipe's own dataclasses: the BOFT adapter and where the model, data and outputs come from.

They sit next to TRL's ``SFTConfig`` / ``DPOConfig``, ``ModelConfig``, ``ScriptArguments`` and
``DatasetMixtureConfig`` in one flat namespace (a recipe YAML is one mapping; every field is also a ``--flag``).
Each dataclass checks what it can on its own in ``__post_init__`` and raises :class:`RecipeError` naming the key.

No ``from __future__ import annotations`` here: TRL's argument parser reads the field types at runtime.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError

BIAS_CHOICES = ("none", "all", "boft_only")
DEFAULT_BLOCK_SIZE = 4  # PEFT's BOFTConfig default
HUB_PARTS = ("adapter", "tokenizer", "single_factor", "merged", "lora", "probe", "summary")  # recipes.hub.HUB_PATTERNS


def _bad(key: str, problem: str, value: Any) -> RecipeError:
    return RecipeError(f"recipe key '{key}': {problem} (got {value!r})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class BoftArguments:
    """The BOFT adapter (PEFT's ``BOFTConfig``; keys are prefixed with ``boft_``)."""

    boft_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Size b of the orthogonal blocks. Set this OR boft_block_num (not both); the default is "
            f"b={DEFAULT_BLOCK_SIZE} when neither is set. Each adapted layer's input width must divide by "
            "b * 2**(boft_n_butterfly_factor - 1)."
        },
    )
    boft_block_num: int | None = field(
        default=None,
        metadata={"help": "Number N of blocks per layer (alternative to boft_block_size; b = width / N)."},
    )
    boft_n_butterfly_factor: int = field(
        default=1,
        metadata={
            "help": "Number m of butterfly factors. m > 1 composes m sparse block rotations into dense blocks of "
            "size b * 2**(m-1); b and N must be even."
        },
    )
    boft_dropout: float = field(
        default=0.0, metadata={"help": "Multiplicative dropout of whole blocks during training, in [0, 1)."}
    )
    boft_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or one regular expression, or 'all-linear'. Default: PEFT's "
            "defaults for the model type (q_proj, v_proj for Llama)."
        },
    )
    boft_exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names (or one regular expression) never to adapt."}
    )
    boft_bias: str = field(
        default="none",
        metadata={"help": "Which biases to train: 'none', 'all' or 'boft_only'.", "choices": list(BIAS_CHOICES)},
    )
    boft_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."},
    )
    boft_layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (with boft_layers_pattern if needed)."}
    )
    boft_layers_pattern: list[str] | None = field(
        default=None,
        metadata={"help": "Name of the layer list that boft_layers_to_transform indexes (e.g. 'layers')."},
    )
    boft_init_weights: bool = field(
        default=True, metadata={"help": "Start from the identity rotation (True) or from random blocks (False)."}
    )
    boft_fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Set True for layers that store their weight as (in, out), like GPT-2."}
    )

    def __post_init__(self):
        from ..tuner.geometry import GeometryError, check_block_config

        size, num, m = self.boft_block_size, self.boft_block_num, self.boft_n_butterfly_factor
        if size is None and num is None:  # neither key given: PEFT's default block size
            size = DEFAULT_BLOCK_SIZE
        self.boft_block_size = 0 if size is None else size
        self.boft_block_num = 0 if num is None else num
        try:  # the width-independent rules, decided by the tuner's geometry alone (widths are checked on the model)
            check_block_config(self.boft_block_size, self.boft_block_num, m)
        except GeometryError as err:
            keys = f"key '{err.key}'" if err.key else "keys 'boft_block_size' / 'boft_block_num'"
            raise RecipeError(f"recipe {keys}: {err.reason}") from None
        if not isinstance(self.boft_dropout, int | float) or not 0.0 <= self.boft_dropout < 1.0:
            raise _bad("boft_dropout", "must be a number in [0, 1)", self.boft_dropout)
        if self.boft_bias not in BIAS_CHOICES:
            raise _bad("boft_bias", f"must be one of {', '.join(BIAS_CHOICES)}", self.boft_bias)
        for key in ("boft_target_modules", "boft_exclude_modules", "boft_modules_to_save", "boft_layers_pattern"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [value]
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                raise _bad(key, "must be a list of module names", value)
            setattr(self, key, value)
        layers = self.boft_layers_to_transform
        if isinstance(layers, int):
            layers = self.boft_layers_to_transform = [layers]
        if layers is not None and not all(_is_int(i) and i >= 0 for i in layers):
            raise _bad("boft_layers_to_transform", "must be a list of non-negative layer indices", layers)

    def to_peft_config(self):
        """PEFT's ``BOFTConfig`` (task ``CAUSAL_LM``) for these arguments."""
        from peft import BOFTConfig

        def one_or_list(value):  # PEFT takes a single name as a regular expression, several as suffixes
            return value[0] if value is not None and len(value) == 1 else value

        try:
            return BOFTConfig(
                task_type="CAUSAL_LM",
                boft_block_size=self.boft_block_size,
                boft_block_num=self.boft_block_num,
                boft_n_butterfly_factor=self.boft_n_butterfly_factor,
                boft_dropout=float(self.boft_dropout),
                target_modules=one_or_list(self.boft_target_modules),
                exclude_modules=one_or_list(self.boft_exclude_modules),
                bias=self.boft_bias,
                modules_to_save=self.boft_modules_to_save,
                layers_to_transform=self.boft_layers_to_transform,
                layers_pattern=one_or_list(self.boft_layers_pattern),
                init_weights=self.boft_init_weights,
                fan_in_fan_out=self.boft_fan_in_fan_out,
            )
        except ValueError as err:  # PEFT's own checks (e.g. layers_pattern without layers_to_transform)
            raise RecipeError(f"BOFT recipe keys rejected by PEFT's BOFTConfig: {err}") from err


@dataclass
class RecipeOptions:
    """boft-plugin's own recipe keys: where the model and tokenizer come from, how DPO starts, what is written."""

    tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Build a tiny random Llama (boft_plugin.toy.models.tiny_llama_config) instead of loading "
            "model_name_or_path; model_config entries override its fields. For tests and demos."
        },
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Build a randomly initialised model from this config instead of loading weights: a mapping "
            "with 'model_type' (YAML), a JSON string, or a path to a config.json. With tiny_model: overrides only."
        },
    )
    model_seed: int | None = field(
        default=None, metadata={"help": "Seed of a config-built model's random weights (default: seed)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer to load (default: the model's; the init adapter's directory if it has one; the "
            "local character tokenizer boft_plugin.toy.models.char_tokenizer for config-built models)."
        },
    )
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Directory of a BOFT adapter (e.g. an SFT run's output_dir) to continue training. Its "
            "base_model_name_or_path is the base model when no model is given. For DPO the frozen reference is "
            "this adapter as loaded (TRL's 'ref' adapter)."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Evaluation data: a local .json/.jsonl/.parquet/.csv file or directory, or a hub name."},
    )
    export_merged: bool = field(
        default=False,
        metadata={"help": "Also write a merged plain transformers model to <output_dir>/merged at the end."},
    )
    export_single_factor: bool = field(
        default=False,
        metadata={
            "help": "Also write <output_dir>/single_factor: the exactly equivalent m = 1 adapter (block size "
            "b * 2**(m-1)) that stock PEFT loads without its CUDA extension (boft-plugin convert --single-factor)."
        },
    )
    export_lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "Also write <output_dir>/lora: the adapter as a PEFT LoRA adapter of this rank for LoRA-only "
            "servers (truncated SVD of each layer's weight delta; its error in lora/lora_conversion.json). "
            "Or set export_lora_max_error instead (boft-plugin convert --to-lora, docs/lora.md)."
        },
    )
    export_lora_max_error: float | None = field(
        default=None,
        metadata={
            "help": "Instead of export_lora_rank: per layer the smallest rank whose relative Frobenius error of "
            "the weight delta is at most this; the run fails at the end, writing no lora/, if none meets it."
        },
    )
    export_lora_max_rank: int | None = field(
        default=None, metadata={"help": "With export_lora_max_error: the largest LoRA rank allowed."}
    )
    export_lora_ranks: str | None = field(
        default=None,
        metadata={"help": "Snap the LoRA ranks up to a server's allowed ranks: vllm (1, 8, 16, ..., 512)."},
    )
    fsdp2_pre_shard: bool = field(
        default=False,
        metadata={
            "help": "Shard the adapted model with FSDP2 (boft_plugin.distributed.fsdp2.shard_for_fsdp2) before the "
            "trainer wraps it: the FSDP2 route on the CPU under torch.distributed.run, where accelerate's FSDP "
            "plugin does not run."
        },
    )
    fsdp2_hsdp: bool = field(
        default=False,
        metadata={
            "help": "With fsdp2_pre_shard on several nodes: HSDP, each parameter sharded within a node and replicated "
            "across nodes (a 2-D mesh of nodes x LOCAL_WORLD_SIZE ranks): the per-block all-gathers stay on the "
            "node's links, the gradients cross nodes once per step. Without it the mesh is flat."
        },
    )
    probe_text: str | None = field(
        default=None,
        metadata={
            "help": "After training, run the trained model on this text and save input ids and logits to "
            "<output_dir>/probe_logits.pt (for reload checks; see `boft-plugin verify`)."
        },
    )
    data_order_tail: str = field(
        default="drop",
        metadata={
            "help": "What each epoch does with its last rows when the dataset size is not a multiple of the global "
            "batch G = per_device_train_batch_size x world size x gradient_accumulation_steps: 'drop' them (every "
            "epoch has floor(n/G) full steps) or 'pad' with the epoch's first rows (ceil(n/G) full steps). Either "
            "way every optimizer step sees the same rows at any number of ranks (docs/trl.md, Data order).",
            "choices": ["drop", "pad"],
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow writing into an output_dir that holds an adapter or model this run did not write (another "
            "PEFT type, base model or BOFT geometry), or checkpoint-N directories the Trainer would write over (it "
            "then writes its checkpoints over same-named ones; nothing is deleted). Without it such a run is refused "
            "before anything is written."
        },
    )
    trust_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint that boft-plugin did not write for this user (no completion marker "
            "signed with this user's key) although resuming it unpickles files (DeepSpeed's engine state, "
            "torch.distributed.checkpoint metadata), which runs any code they contain. Only for checkpoints whose "
            "origin you trust."
        },
    )
    hub_upload: list[str] = field(
        default_factory=lambda: ["adapter", "tokenizer"],
        metadata={
            "help": "With push_to_hub: what the end-of-run upload holds, from adapter, tokenizer, single_factor, "
            "merged, probe, summary (the model card README.md always goes). Checkpoints follow hub_strategy."
        },
    )

    def __post_init__(self):
        for key in ("tokenizer_name_or_path", "init_adapter", "eval_dataset_name", "probe_text"):
            if getattr(self, key) == "":  # `--init_adapter ""` on the command line unsets a YAML value
                setattr(self, key, None)
        if self.model_config == "":
            self.model_config = None
        if isinstance(self.model_config, str):
            text = self.model_config.strip()
            if text.startswith("{"):
                try:
                    self.model_config = json.loads(text)
                except json.JSONDecodeError as err:
                    raise _bad("model_config", f"is not valid JSON ({err})", text) from err
            else:
                path = text if os.path.isfile(text) else os.path.join(text, "config.json")
                if not os.path.isfile(path):
                    raise _bad("model_config", "must be a mapping, a JSON string or an existing config.json", text)
                with open(path) as handle:
                    self.model_config = json.load(handle)
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise _bad("model_config", "must be a mapping of config fields", self.model_config)
        if self.model_config is not None and not self.tiny_model and "model_type" not in self.model_config:
            raise RecipeError(
                "recipe key 'model_config': needs a 'model_type' entry (e.g. llama) unless tiny_model is true "
                f"(got keys {sorted(self.model_config)})"
            )
        if isinstance(self.hub_upload, str):
            self.hub_upload = [self.hub_upload]
        unknown = sorted(set(self.hub_upload) - set(HUB_PARTS))
        if unknown:
            raise _bad(
                "hub_upload", f"holds unknown part(s) {unknown}; choose from {', '.join(HUB_PARTS)}", self.hub_upload
            )
        self._check_lora_export()
        if self.data_order_tail not in ("drop", "pad"):
            raise _bad("data_order_tail", "must be 'drop' or 'pad'", self.data_order_tail)
        if self.init_adapter is not None and not os.path.isfile(os.path.join(self.init_adapter, "adapter_config.json")):
            raise _bad("init_adapter", "must be a directory holding adapter_config.json", self.init_adapter)

    def lora_options(self):
        """The ``export_lora_*`` keys as :class:`boft_plugin.export.lora.LoraOptions` (None: no LoRA export)."""
        if self.export_lora_rank is None and self.export_lora_max_error is None:
            return None
        from ..export.lora_report import LoraOptions

        return LoraOptions(
            self.export_lora_rank, self.export_lora_max_error, self.export_lora_max_rank, self.export_lora_ranks
        )

    def _check_lora_export(self) -> None:
        from ..errors import LoraConversionError

        options = self.lora_options()
        if options is None:
            extra = [k for k in ("export_lora_max_rank", "export_lora_ranks") if getattr(self, k) is not None]
            if extra:
                raise RecipeError(f"recipe key '{extra[0]}': needs export_lora_rank or export_lora_max_error")
            return
        try:
            options.check()
        except LoraConversionError as err:
            raise RecipeError(f"recipe keys export_lora_*: {err}") from None
