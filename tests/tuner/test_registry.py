"""register() / unregister(): idempotent, reversible, and importing the package changes nothing."""

import subprocess
import sys

from peft import BOFTConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.boft.model import BOFTModel
from peft.utils import PeftType

import boft_plugin
from boft_plugin.tuner import BoftTuner


def test_register_is_idempotent_and_unregister_restores():
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOFT] is BOFTModel
    boft_plugin.register()
    boft_plugin.register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOFT] is BoftTuner and boft_plugin.is_registered()
    boft_plugin.unregister()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOFT] is BOFTModel and not boft_plugin.is_registered()
    boft_plugin.unregister()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOFT] is BOFTModel


def test_get_peft_model_follows_registration():
    import torch

    def build():
        layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
        return get_peft_model(layer, BOFTConfig(target_modules=["0"], boft_block_size=4)).base_model

    boft_plugin.register()
    assert type(build()) is BoftTuner
    boft_plugin.unregister()
    from boft_plugin.stock_peft import stock_peft_boft

    with stock_peft_boft(multi_factor=False):  # stock PEFT, without its CUDA build attempt
        assert type(build()) is BOFTModel


def test_importing_the_package_changes_nothing_and_imports_no_peft():
    code = (
        "import sys, boft_plugin\n"
        "assert 'peft' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as M\n"
        "from peft.utils import PeftType\n"
        "from peft.tuners.boft.model import BOFTModel\n"
        "assert M[PeftType.BOFT] is BOFTModel\n"
        "boft_plugin.register(); assert M[PeftType.BOFT] is not BOFTModel\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
