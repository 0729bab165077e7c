"""Shared fixtures: registration around a test, tiny models, and PEFT's oracle."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import BOFTConfig, get_peft_model

import boft_plugin
from boft_plugin.launchers import ATTEMPTS_ENV
from boft_plugin.ops.compare import max_relative_error
from boft_plugin.stock_peft import stock_peft_boft


def pytest_configure(config):
    # A launch that hangs (rare on a loaded 2-core machine: gloo on loopback) is stopped at its timeout with the
    # workers' stacks and started once more; the stacks reach the warnings summary (boft_plugin.launchers.run).
    os.environ.setdefault(ATTEMPTS_ENV, "2")


@pytest.fixture(autouse=True)
def _restore_peft_routing():
    """Every test starts and ends with PEFT's own routing, whatever it did in between."""
    boft_plugin.unregister()
    yield
    boft_plugin.unregister()


@pytest.fixture
def registered():
    boft_plugin.register()
    yield
    boft_plugin.unregister()


class MLP(torch.nn.Module):
    """Three linear layers of different widths (one non-power of two) with a bias toggle."""

    def __init__(self, width: int = 64, hidden: int = 96, out: int = 24, bias: bool = True):
        super().__init__()
        self.lin0 = torch.nn.Linear(width, hidden, bias=bias)
        self.lin1 = torch.nn.Linear(hidden, hidden, bias=bias)
        self.head = torch.nn.Linear(hidden, out, bias=bias)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def build_pair(base: torch.nn.Module, config_kwargs: dict, multi_factor: bool = True):
    """(stock PEFT model, our model) with identical adapter weights; the stock one must run in `stock_peft_boft`."""
    with stock_peft_boft(multi_factor=multi_factor):
        stock = get_peft_model(copy.deepcopy(base), BOFTConfig(**config_kwargs))
    boft_plugin.register()
    try:
        ours = get_peft_model(copy.deepcopy(base), BOFTConfig(**config_kwargs))
    finally:
        boft_plugin.unregister()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


max_rel_err = max_relative_error
