"""Load adapters with stock PEFT exactly as installed, in a process that never imports boft_plugin.

    python load_with_stock_peft.py CASES.json     # prints one JSON line

CASES.json: a list of {"dir", "kind", "input", "expected"} (see models.py for the kinds); each adapter is loaded with
``PeftModel.from_pretrained`` on the same small model, run on the saved input and compared with the saved output.
"""

import json
import sys
import warnings

import torch
from peft import PeftModel
from peft.tuners.boft import layer as peft_boft_layer
from stock_models import build

with open(sys.argv[1]) as handle:
    cases = json.load(handle)
results = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT warns that its CUDA extension cannot build (no CUDA): expected
    for case in cases:
        model = PeftModel.from_pretrained(build(case["kind"]), case["dir"]).eval()
        layer = next(m for m in model.modules() if hasattr(m, "boft_R") and len(m.boft_R))
        x = torch.load(case["input"], weights_only=True)
        expected = torch.load(case["expected"], weights_only=True)
        with torch.no_grad():
            y = model(x)
        results.append(
            {
                "dir": case["dir"],
                "rel": ((y - expected).abs().max() / expected.abs().max()).item(),
                "layer": f"{type(layer).__module__}.{type(layer).__name__}",
                "boft_R": list(next(iter(layer.boft_R.values())).shape),
            }
        )
print(
    json.dumps(
        {
            "results": results,
            "boft_plugin_imported": "boft_plugin" in sys.modules,
            "fbd_cuda": repr(peft_boft_layer._FBD_CUDA),
        }
    )
)
