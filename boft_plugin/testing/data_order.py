"""Data order of transformers 5.24's Trainer + accelerate 1.15, simulated in one process for W ranks (tests).

Builds the train DataLoader as Trainer._get_dataloader does (sampler, batch_size=b, drop_last), prepares it with
accelerate's prepare_data_loader(num_processes=W, process_index=r) exactly as Accelerator.prepare would, then
replays Trainer._run_epoch's step logic (set_initial_training_values, _init_training_state, skip_first_batches on
resume, set_epoch, GA chunking with the short last group). Returns, for each optimizer step, the rows of every
rank's micro-batches. No model, no process group.

``mode`` is ``"baseline"`` (the stock sampler) or a tail rule of :mod:`boft_plugin.recipes.data_order`.
"""

from __future__ import annotations

import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader, RandomSampler

from ..recipes.data_order import GlobalBatchSampler


def make_loader(n, W, r, b, ga, seed, mode, drop_last=False, even_batches=True, split_batches=False):
    data = list(range(n))
    torch.manual_seed(seed)  # Trainer.__init__: set_seed(args.seed) -> torch.random.initial_seed() == seed
    if mode == "baseline":
        sampler = RandomSampler(data)
    else:
        G = (b * ga) if split_batches else b * W * ga
        sampler = GlobalBatchSampler(n, G, seed, tail=mode)
    dl = DataLoader(data, sampler=sampler, batch_size=b, drop_last=drop_last, collate_fn=lambda x: x)
    dl = prepare_data_loader(
        dl,
        num_processes=W,
        process_index=r,
        put_on_device=False,
        even_batches=even_batches,
        split_batches=split_batches,
        use_seedable_sampler=True,
        data_seed=None,
    )
    if mode != "baseline":
        dl.set_sampler(sampler)
    return dl


def run_rank(n, W, r, b, ga, seed, mode, max_steps, resume_at=None, **kw):
    """Rows per optimizer step on rank r: list over steps of list over micro-steps of lists of rows."""
    dl = make_loader(n, W, r, b, ga, seed, mode, **kw)
    len_dl = len(dl)
    spe = max(len_dl // ga + int(len_dl % ga > 0), 1)  # num_update_steps_per_epoch
    steps_in_epoch = len_dl
    epochs = max_steps // spe + int(max_steps % spe > 0)
    out = {}
    global_step = 0
    epochs_trained, skip = 0, 0
    if resume_at is not None:
        global_step = resume_at
        epochs_trained = resume_at // spe
        skip = (resume_at % spe) * ga
    for epoch in range(epochs_trained, epochs):
        loader = dl
        num_trained = 0
        if epoch == epochs_trained and resume_at is not None and skip > 0:
            loader = skip_first_batches(dl, skip)
            num_trained = skip // ga
        loader.set_epoch(epoch)
        shard = getattr(loader, "batch_sampler", None)
        under = getattr(shard, "batch_sampler", None)
        if hasattr(under, "set_epoch"):
            under.set_epoch(epoch)
        it = iter(loader)
        rem = steps_in_epoch % ga or ga
        for update in range(num_trained, spe):
            nb = ga if update != spe - 1 else rem
            batches = []
            for _ in range(nb):
                try:
                    batches.append(next(it))
                except StopIteration:
                    break
            global_step += 1
            out[global_step] = batches
            if global_step >= max_steps:
                return out, spe
    return out, spe


def global_steps(n, W, b, ga, seed, mode, max_steps, resume_at=None, **kw):
    per_rank = [run_rank(n, W, r, b, ga, seed, mode, max_steps, resume_at, **kw) for r in range(W)]
    spe = per_rank[0][1]
    steps = {}
    for step in per_rank[0][0]:
        rows = []
        micro_sizes = []
        for r in range(W):
            for mb in per_rank[r][0].get(step, []):
                rows += mb
                micro_sizes.append(len(mb))
        steps[step] = (tuple(sorted(rows)), tuple(micro_sizes))
    return steps, spe
