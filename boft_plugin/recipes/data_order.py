"""World-size-invariant training data order for transformers' Trainer (and so TRL's SFT/DPO trainers).

Without it, accelerate pads the last partial global batch of an epoch by wrapping around on W > 1 ranks while one
process yields a short batch, so a run and its resume on another number of ranks train on different rows (4.3%
relative adapter difference after 60 steps on 109 rows; docs/design.md, "Data order").

Rule (what every optimizer step sees, for ANY dataset size n and ANY world size W):

    G = per_device_train_batch_size * W * gradient_accumulation_steps      (the global batch; with
        accelerate's split_batches, per_device_train_batch_size is already split: G = batch * GA)
    epoch e: P_e = torch.randperm(n, generator=Generator().manual_seed(S + e)),  S = data_seed or seed
             (sequential strategy: P_e = 0..n-1)
    tail="drop": the epoch is P_e[: floor(n/G)*G]            -> floor(n/G) optimizer steps, all full
    tail="pad":  the epoch is P_e + P_e[: ceil(n/G)*G - n]   -> ceil(n/G) optimizer steps, all full
                 (P_e repeated as often as needed when n < the padding)
    optimizer step k of the epoch uses rows E[k*G : (k+1)*G]; its micro-step j (0 <= j < GA) on rank r
    (0 <= r < W) uses E[k*G + (j*W + r)*b : ... + b], b = per_device_train_batch_size.

The per-step row set E[k*G:(k+1)*G] does not depend on W, b or GA. Every micro-batch on every rank is full (b
rows), so the loss normalisation is W-invariant too: SFT (TRL 1.16, average_tokens_across_devices=True) divides by
the token count of the whole global batch; DPO's per-micro-batch mean over equal-size micro-batches equals the
global mean. When n is a multiple of G the order is exactly what the stock Trainer + accelerate produce (the same
permutation as accelerate's SeedableRandomSampler), so existing runs and checkpoints are unchanged.

How it plugs in: the Trainer builds ``DataLoader(dataset, sampler=self._get_train_sampler(), batch_size=b)`` and
accelerate shards micro-batch i to rank i % W (BatchSamplerShard, no split). Our sampler yields the epoch's
index list E (a whole number of global batches), so the micro-batches are all full, their count is a multiple of
W * GA, and BatchSamplerShard's even_batches wrap-around / short last batch never happen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

TAILS = ("drop", "pad")


class GlobalBatchSampler(Sampler[int]):
    """Index order of one epoch: a seeded permutation cut to a whole number of global batches (see module doc).

    Identical on every rank (a pure function of n, global_batch, seed, epoch, tail); the epoch is set by the
    Trainer through accelerate's ``set_epoch`` chain (``DataLoaderShard.set_sampler`` makes it reachable) and, as
    accelerate's ``SeedableRandomSampler``, advances by itself after a complete pass.
    """

    def __init__(self, num_rows: int, global_batch: int, seed: int, shuffle: bool = True, tail: str = "drop"):
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if tail == "drop" and num_rows < global_batch:
            raise ValueError(
                f"the training set has {num_rows} rows, fewer than one global batch ({global_batch} = "
                "per_device_train_batch_size x world size x gradient_accumulation_steps): no complete step"
            )
        if num_rows < 1:
            raise ValueError("empty training set")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, int(seed)
        self.shuffle, self.tail = shuffle, tail
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        if self.tail == "drop":
            return self.num_rows // self.global_batch
        return math.ceil(self.num_rows / self.global_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        n = self.num_rows
        if self.shuffle:
            generator = torch.Generator()  # on the CPU, as accelerate's SeedableRandomSampler (default device)
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        want = len(self)
        if want <= n:
            return order[:want]
        return (order * math.ceil(want / n))[:want]

    def __iter__(self) -> Iterator[int]:
        yield from self.epoch_order(self.epoch)
        self.set_epoch(self.epoch + 1)


def global_batch_size(trainer) -> int:
    """G for ``trainer``: rows per optimizer step over all data-parallel ranks."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and getattr(accelerator, "split_batches", False):
        return trainer._train_batch_size * trainer.args.gradient_accumulation_steps
    return trainer.get_total_train_batch_size(trainer.args)


class WorldSizeInvariantDataMixin:
    """Put before ``SFTTrainer`` / ``DPOTrainer`` / ``Trainer`` in the bases: the training rows of each optimizer
    step do not depend on the number of ranks (see the module docstring for the rule).

    ``data_order_tail`` ("drop" or "pad") chooses what happens to the ``n mod G`` rows left at an epoch's end.
    """

    data_order_tail: str = "drop"

    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_utils import has_length

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        strategy = self.args.train_sampling_strategy
        if dataset is None or not has_length(dataset):
            # IterableDataset: no sampler; accelerate's IterableDatasetShard pads the last batch on W > 1 ranks,
            # and a datasets.IterableDataset with n_shards >= W is split by shard (order depends on W).
            return super()._get_train_sampler(train_dataset)
        if strategy not in ("random", "sequential"):
            raise ValueError(
                f"train_sampling_strategy={strategy!r} is not world-size invariant here (group_by_length groups "
                "per rank batch * gradient accumulation; batch_rebalance ignores `seed`); use 'random' or "
                "'sequential'"
            )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = GlobalBatchSampler(
            len(dataset), global_batch_size(self), seed, shuffle=strategy == "random", tail=self.data_order_tail
        )
        self._global_batch_sampler = sampler
        return sampler

    def get_train_dataloader(self):
        self._global_batch_sampler = None
        loader = super().get_train_dataloader()
        sampler = getattr(self, "_global_batch_sampler", None)
        # accelerate reaches a sampler's set_epoch through BatchSamplerShard.sampler only when it was set with
        # set_sampler (it does so for its own SeedableRandomSampler). Without this, a run resumed mid-epoch on
        # W > 1 ranks (skip_first_batches -> SkipBatchSampler(BatchSamplerShard(...))) would replay epoch 0's order.
        if sampler is not None and hasattr(loader, "set_sampler"):
            loader.set_sampler(sampler)
        return loader


def check_data_order(training, options, num_rows: int | None, task: str) -> None:
    """Refuse, before anything is loaded, what the world-size-invariant order cannot honour (RecipeError)."""
    import warnings

    from ..errors import RecipeError

    if task in ("grpo", "rloo"):  # TRL's RepeatSampler: seeded, the same on every rank, whole generation batches
        prompts = training.generation_batch_size // training.num_generations
        if num_rows is not None and num_rows < prompts:
            raise RecipeError(
                f"the training set has {num_rows} prompts, fewer than one generation batch ({prompts} = "
                f"generation_batch_size {training.generation_batch_size} / num_generations {training.num_generations})"
                ": TRL's sampler keeps whole generation batches only, so no step would run"
            )
        if options.data_order_tail != "drop":
            warnings.warn(
                f"data_order_tail: {options.data_order_tail} is not used by {task.upper()}: TRL's own sampler "
                "yields whole generation batches and drops an epoch's partial one",
                stacklevel=2,
            )
        return
    strategy = getattr(training, "train_sampling_strategy", "random")
    if task == "kto" and training.loss_type != "apo_zero_unpaired":  # TRL's KTOTrainer refuses these after loading
        if strategy != "sequential":
            raise RecipeError(
                f"recipe key 'train_sampling_strategy': KTO's '{training.loss_type}' loss estimates its KL term from "
                "each row's neighbour in a fixed-order batch, so TRL needs 'sequential' (KTO's default); got "
                f"{strategy!r}"
            )
        if training.per_device_train_batch_size <= 1:
            raise RecipeError(
                f"recipe key 'per_device_train_batch_size': KTO's '{training.loss_type}' loss pairs each row with "
                "another of its micro-batch for the KL term; use 2 or more (or loss_type: apo_zero_unpaired)"
            )
    if strategy not in ("random", "sequential"):
        raise RecipeError(
            f"recipe key 'train_sampling_strategy': {strategy!r} makes the rows of a step depend on the number of "
            "ranks (group_by_length groups per rank; batch_rebalance ignores the seed); use 'random' or 'sequential'"
        )
    global_batch = training.per_device_train_batch_size * training.world_size * training.gradient_accumulation_steps
    if num_rows is not None and options.data_order_tail == "drop" and num_rows < global_batch:
        raise RecipeError(
            f"the training set has {num_rows} rows, fewer than one global batch ({global_batch} = "
            "per_device_train_batch_size x world size x gradient_accumulation_steps): no complete step; use "
            "data_order_tail: pad or a smaller batch"
        )
    if task == "sft" and not getattr(training, "average_tokens_across_devices", True):
        warnings.warn(
            "average_tokens_across_devices: false averages the loss per rank, so the same rows give different "
            "gradients on different numbers of ranks; resuming on another world size will not reproduce the run",
            stacklevel=2,
        )
