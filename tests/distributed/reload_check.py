"""Fresh-process check of exported artifacts: stock PEFT reloads the adapter, transformers the merged model.

    python reload_check.py --base BASE_DIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds ``adapter/``, ``merged/`` and ``logits.pt`` (probe ids and the trained model's logits).
Exits 1 with a message on the first mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from boft_plugin.stock_peft import stock_peft_boft


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    for run in args.runs:
        saved = torch.load(f"{run}/logits.pt", weights_only=True)
        with stock_peft_boft(multi_factor=True), torch.no_grad():
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base), f"{run}/adapter")
            adapter_logits = model.eval()(input_ids=saved["probe"]).logits
        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(f"{run}/merged").eval()
            merged_logits = merged(input_ids=saved["probe"]).logits
        for what, logits in (("stock PEFT adapter", adapter_logits), ("merged model", merged_logits)):
            err = (logits - saved["logits"]).abs().max().item()
            print(f"{run}: {what} max |logit diff| = {err:.2e}")
            if not err < args.atol:
                print(f"MISMATCH: {what} reloaded from {run} differs from the trained model by {err}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
