"""Fresh-process check of exported artifacts: stock PEFT reloads the adapter, transformers the merged model.

    python reload_check.py --base BASE_DIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds ``adapter/``, ``merged/`` and ``logits.pt`` (probe ids and the trained model's logits).
Exits 1 with a message on the first mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch

from boft_plugin.export.verify import reload_and_compare


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max relative logit error")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    for run in args.runs:
        saved = torch.load(f"{run}/logits.pt", weights_only=True)
        report = reload_and_compare(f"{run}/adapter", args.base, saved["probe"], saved["logits"], f"{run}/merged")
        for key in ("oracle_rel_err", "merged_rel_err"):
            print(f"{run}: {key} = {report[key]:.2e} ({report['stock_layer']})")
            if not report[key] <= args.tolerance:
                print(f"MISMATCH: {key} of {run} is {report[key]}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
