"""Upstream fact the project exists for, kept visible: stock PEFT's BOFT without its CUDA extension (on the CPU)
trains one butterfly factor whatever the config says. A PEFT release that changes this fails here."""

import torch
from peft import BOFTConfig, get_peft_model

from boft_plugin.stock_peft import stock_peft_boft


def test_stock_peft_without_patch_silently_uses_one_factor():
    """The trap this project exists for, kept visible: stock PEFT on CPU drops to m = 1."""
    config = BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=3)
    with stock_peft_boft(multi_factor=False):
        stock = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), config)
    assert stock.base_model.model[0].boft_R["default"].shape[0] == 1
    assert stock.peft_config["default"].boft_n_butterfly_factor == 3
