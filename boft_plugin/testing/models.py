"""Small models and model pairs for tests: an MLP of three widths, and (stock PEFT, boft-plugin) twins."""

from __future__ import annotations

import copy

import torch
from peft import BOFTConfig, get_peft_model

from ..ops.compare import max_relative_error
from ..stock_peft import stock_peft_boft
from ..tuner.registry import register, unregister

__all__ = ["MLP", "build_pair", "max_rel_err"]

max_rel_err = max_relative_error


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
    register()
    try:
        ours = get_peft_model(copy.deepcopy(base), BOFTConfig(**config_kwargs))
    finally:
        unregister()
    ours.load_state_dict(stock.state_dict())
    return stock, ours
