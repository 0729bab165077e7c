"""The bf16 / fp16 error table of docs/numerics.md: ours vs stock PEFT in the same precision, against float64.

    python benchmarks/low_precision_table.py            # prints the markdown table (about 1-2 minutes on 2 cores)

Cases and criterion: boft_plugin/testing/low_precision.py (the same code the tests run).
"""

from __future__ import annotations

from boft_plugin.testing.low_precision import CASES, QUANTITIES, run_case, worse_than_stock


def main() -> None:
    print("| bias | mode | dtype | m | s | " + " | ".join(f"{q}: stock / ours" for q in QUANTITIES) + " | ours ok |")
    print("|" + "---|" * (6 + len(QUANTITIES)))
    failed = 0
    for case in CASES:
        row = run_case(*case)
        bias = "init" if row["bias_scale"] is None else f"N(0, {row['bias_scale']:g}^2)"
        cells = [bias, row["mode"], row["dtype"], str(row["m"]), f"{row['s']:g}"]
        cells += [f"{row[f'stock|{q}']:.1e} / {row[f'ours|{q}']:.1e}" for q in QUANTITIES]
        ok = not worse_than_stock(row)
        failed += not ok
        cells.append("yes" if ok else "NO")
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n{len(CASES) - failed} of {len(CASES)} cases no worse than stock PEFT (criterion in low_precision.py)")


if __name__ == "__main__":
    main()
