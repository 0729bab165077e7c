"""Route PEFT's ``BOFT`` type to our tuner (``register``) and back (``unregister``).

PEFT's ``PeftType`` enum is closed and ``register_peft_method`` refuses the taken name ``boft``, but every PEFT
entry point (``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``, the state-dict helpers) looks
the tuner up in ``peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOFT]`` at call time, so swapping that one
entry is enough. The config class stays PEFT's ``BOFTConfig``: checkpoints are unchanged.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_stock_tuner: type | None = None


def _mapping() -> dict:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING


def register() -> None:
    """Make PEFT build BOFT adapters with boft_plugin's layers. Idempotent."""
    from peft.utils import PeftType

    from .model import BoftTuner

    global _stock_tuner
    with _lock:
        mapping = _mapping()
        current = mapping[PeftType.BOFT]
        if current is BoftTuner:
            return
        _stock_tuner = current
        mapping[PeftType.BOFT] = BoftTuner


def unregister() -> None:
    """Restore PEFT's own BOFT tuner. Idempotent; a no-op if ``register()`` was never called."""
    from peft.utils import PeftType

    global _stock_tuner
    with _lock:
        if _stock_tuner is None:
            return
        _mapping()[PeftType.BOFT] = _stock_tuner
        _stock_tuner = None


def is_registered() -> bool:
    """Whether PEFT currently routes BOFT to boft_plugin."""
    from peft.utils import PeftType

    from .model import BoftTuner

    return _mapping()[PeftType.BOFT] is BoftTuner
