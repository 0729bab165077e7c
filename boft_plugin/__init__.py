"""boft-plugin: a fast, exact, sharding-aware BOFT backend for PEFT.

Importing the package changes nothing; call :func:`register` to route PEFT's ``BOFT`` type to this tuner::

    import boft_plugin
    boft_plugin.register()
    model = peft.get_peft_model(model, peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, ...))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, imported on first use so that `import boft_plugin` stays cheap and side-effect free.
_LAZY = {
    "register": ".tuner.registry",
    "unregister": ".tuner.registry",
    "is_registered": ".tuner.registry",
    "BoftTuner": ".tuner.model",
    "BoftModel": ".tuner.model",
    "BoftError": ".errors",
    "BoftTargetError": ".errors",
    "BoftSaveError": ".errors",
    "BoftCheckpointError": ".errors",
    "BoftNumericsError": ".errors",
    "BoftExportError": ".errors",
    "BoftQuantisedMergeError": ".errors",
    "ShardingOrderError": ".errors",
    "RecipeError": ".errors",
    "check_numerics": ".tuner.numerics",
    "NumericsGuardCallback": ".recipes.callbacks",
    "load_adapter": ".export.loading",
    "read_adapter": ".export.loading",
    "export_adapter": ".export",
    "export_merged": ".export",
    "export_lora": ".export",
    "convert_to_lora": ".export",
    "LoraConversionError": ".errors",
    "LoraBudgetError": ".errors",
    "stock_peft_boft": ".stock_peft",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'boft_plugin' has no attribute {name!r}")
