"""Load a LoRA adapter with stock PEFT in a process that never imports boft_plugin (what a user or server does).

    python load_lora.py BASE_DIR LORA_DIR INPUT_IDS.pt OUT.pt     # prints one JSON line

Saves the logits to OUT.pt and prints the LoRA layer class, its ranks and scalings.
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, lora_dir, ids_file, out_file = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_dir).eval()
layers = [m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_file, weights_only=True)).logits
torch.save(logits, out_file)
print(
    json.dumps(
        {
            "boft_plugin_imported": "boft_plugin" in sys.modules,
            "layer": f"{type(layers[0]).__module__}.{type(layers[0]).__name__}",
            "layers": len(layers),
            "ranks": sorted({m.r["default"] for m in layers}),
            "scalings": sorted({m.scaling["default"] for m in layers}),
        }
    )
)
