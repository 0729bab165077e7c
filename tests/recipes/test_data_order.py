"""Fast checks (one process, no model): the rows of every optimizer step do not depend on the world size, for any
dataset size, also after a resume mid-epoch (skip_first_batches) at epoch >= 1; unchanged when n % G == 0."""

from __future__ import annotations

import pytest

from boft_plugin.testing.data_order import global_steps

CONFIGS = [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2), (4, 2, 1), (4, 1, 2), (1, 2, 4)]  # (W, b, GA), G = 8


@pytest.mark.parametrize("tail", ["drop", "pad"])
@pytest.mark.parametrize("n", [8, 12, 61, 64, 104, 109])
def test_step_rows_do_not_depend_on_world_size(n, tail):
    ref, spe = global_steps(n, *CONFIGS[0], 0, tail, 40)
    assert all(len(rows) == 8 for rows, _ in ref.values())  # every step full
    assert all(all(s == sizes[0] for s in sizes) for _, sizes in ref.values())
    for cfg in CONFIGS[1:]:
        got, got_spe = global_steps(n, *cfg, 0, tail, 40)
        assert got_spe == spe
        assert {s: v[0] for s, v in got.items()} == {s: v[0] for s, v in ref.items()}, cfg


@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_resume_on_other_world_size_mid_epoch(tail):
    n = 109
    ref, spe = global_steps(n, 2, 4, 1, 0, tail, 60)
    for resume_at in (5, spe, spe + 3, 2 * spe + 1):
        for cfg in CONFIGS:
            got, _ = global_steps(n, *cfg, 0, tail, 60, resume_at=resume_at)
            assert {s: v[0] for s, v in got.items()} == {s: ref[s][0] for s in got}, (resume_at, cfg)


@pytest.mark.parametrize("n", [64, 104])
def test_same_order_as_stock_when_dataset_is_a_multiple_of_the_global_batch(n):
    stock, _ = global_steps(n, 2, 4, 1, 0, "baseline", 40)
    for tail in ("drop", "pad"):
        assert global_steps(n, 2, 4, 1, 0, tail, 40)[0] == stock


def test_stock_order_depends_on_world_size_at_epoch_end():
    """What the sampler fixes: with 109 rows the stock loader gives 1 rank and 2 ranks different rows at an epoch's
    end (padding by wrap-around on 2 ranks, a short batch on 1)."""
    one, _ = global_steps(109, 1, 8, 1, 0, "baseline", 20)
    two, _ = global_steps(109, 2, 4, 1, 0, "baseline", 20)
    differ = [step for step in one if one[step][0] != two[step][0]]
    assert differ and min(differ) == 14  # the first step after the 13 full ones
