"""The data-order mixin through a real (tiny) transformers ``Trainer``, one process: its optimizer steps see exactly
the rows that the loader-level check (tests/recipes/test_data_order.py) proves the same on any number of ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from boft_plugin.recipes.data_order import WorldSizeInvariantDataMixin
from boft_plugin.testing.data_order import global_steps

SEED = 3


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return {"loss": (self.w * x).mean() + self.w.square().sum()}


class _Invariant(WorldSizeInvariantDataMixin, Trainer):
    pass


def rows_per_step(trainer_class, tmp_path, n: int, batch: int, accumulation: int, steps: int, tail: str) -> dict:
    seen: list[list[int]] = []

    def collate(features):
        seen.append([f["idx"] for f in features])
        return {"x": torch.tensor([float(f["idx"]) for f in features])}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=SEED,
    )
    data = [{"idx": i} for i in range(n)]
    trainer = trainer_class(model=_Tiny(), args=args, train_dataset=data, data_collator=collate)
    trainer.data_order_tail = tail
    trainer.train()
    per_step = [seen[i : i + accumulation] for i in range(0, len(seen), accumulation)]
    return {
        step: tuple(sorted(r for micro in micro_batches for r in micro))
        for step, micro_batches in enumerate(per_step[:steps], start=1)
    }


@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_trainer_steps_see_the_world_size_invariant_rows(tmp_path, tail):
    n, steps = 61, 10  # 61 % 8 != 0, and 10 steps run into a second epoch
    got = rows_per_step(_Invariant, tmp_path, n, 4, 2, steps, tail)
    for world, batch in ((1, 4), (2, 2), (4, 1)):  # G = 8 in each
        want, _ = global_steps(n, world, batch, 2, SEED, tail, steps)
        assert got == {step: rows for step, (rows, _) in want.items()}, (world, tail)


def test_a_stock_trainer_sees_other_rows(tmp_path):
    ours = rows_per_step(_Invariant, tmp_path / "ours", 61, 4, 2, 10, "drop")
    stock = rows_per_step(Trainer, tmp_path / "stock", 61, 4, 2, 10, "drop")
    assert ours != stock  # the mixin really replaced the Trainer's sampler
