"""Tables of ``bench_real_model.py``: every ratio from the raw medians of the same run, with its spread.

Spread of a ratio: the repeats are interleaved (round ``i`` runs every method once), so ``t_A[i] / t_B[i]`` is a
paired ratio per round; the tables show the ratio of the medians and ``[min-max]`` of the paired ratios.
"""

from __future__ import annotations

import statistics

from .common import fmt_int, fmt_mib, fmt_ms, markdown_table

TIME_KEYS = {"cpu_median_ms": "cpu_times_ms", "median_ms": "times_ms"}


def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("status") == "ok"


def ratio(a: dict | None, b: dict | None, metric: str) -> dict | None:
    """``a / b`` of the medians, and min / max of the per-round paired ratios."""
    if not (_ok(a) and _ok(b)) or not b[metric]:
        return None
    key = TIME_KEYS[metric]
    pairs = [x / y for x, y in zip(a.get(key, []), b.get(key, [])) if y > 0]
    return {
        "ratio": a[metric] / b[metric],
        "paired_min": min(pairs) if pairs else None,
        "paired_max": max(pairs) if pairs else None,
        "paired_median": statistics.median(pairs) if pairs else None,
    }


def fmt_ratio(r: dict | None, spread: bool = True) -> str:
    if r is None:
        return "—"
    text = f"{r['ratio']:.2f}"
    if spread and r["paired_min"] is not None:
        text += f" [{r['paired_min']:.2f}–{r['paired_max']:.2f}]"
    return text


def _time(row: dict, metric: str) -> str:
    if not _ok(row):
        return "—"
    lo, hi = ("cpu_min_ms", "cpu_max_ms") if metric == "cpu_median_ms" else ("min_ms", "max_ms")
    return f"{fmt_ms(row[metric])} [{fmt_ms(row[lo])}–{fmt_ms(row[hi])}]"


def _by_key(rows: list[dict]) -> dict[str, dict]:
    return {row["method"]: row for row in rows}


def lora_row(rows: list[dict], lora_by_m: dict, m: int, compiled: bool = False) -> dict | None:
    """The LoRA row matched to BOFT with ``m`` factors (its compiled twin for a compiled row)."""
    key = lora_by_m.get(m) or lora_by_m.get(str(m), "")
    return _by_key(rows).get(key + ("_compiled" * compiled)) if key else None


def base_row(rows: list[dict], compiled: bool = False) -> dict | None:
    return _by_key(rows).get("base" + ("_compiled" * compiled))


def _matched(rows: list[dict], row: dict, lora_by_m: dict) -> dict | None:
    if row["kind"] not in ("ours", "stock"):
        return None
    return lora_row(rows, lora_by_m, row["m"], row.get("compiled", False))


def key_ratios(result: dict, metric: str) -> dict[str, dict | None]:
    """The headline ratios of one run: ours m / matched LoRA, stock m=1 / ours m=1, ours m / base."""
    rows, by_key = result["rows"], _by_key(result["rows"])
    out: dict[str, dict | None] = {}
    for row in rows:
        if row["kind"] == "ours":
            m, compiled = row["m"], row.get("compiled", False)
            suffix = ", both compiled" if compiled else ""
            out[f"ours m={m} / LoRA{suffix}"] = ratio(row, lora_row(rows, result["lora_by_m"], m, compiled), metric)
            out[f"ours m={m} / base{suffix}"] = ratio(row, base_row(rows, compiled), metric)
    out["stock m=1 / ours m=1"] = ratio(by_key.get("stock_m1"), by_key.get("ours_m1"), metric)
    return out


def _note(row: dict) -> str:
    if not _ok(row):
        return row.get("note", row.get("status", ""))
    if row["kind"] == "lora":
        return f"r matched to BOFT m={row['m']} ({row['matched_boft_params']:,} params)"
    if row["kind"] == "stock" and "est_step_s" in row:
        return f"est. was {row['est_step_s']:.1f} s/step"
    return ""


def model_table(result: dict, metric: str, cuda: bool) -> str:
    rows, by_key = result["rows"], _by_key(result["rows"])
    first = "CPU ms/step median [min–max]" if metric == "cpu_median_ms" else "ms/step median [min–max]"
    headers = ["method", "trainable params", first, "× base", "× matched LoRA", "× ours m=1"]
    if metric == "cpu_median_ms":
        headers += ["wall ms median [min–max]", "wall × LoRA"]
    headers += ["peak ΔRSS MiB", "saved act. MiB", "host syncs fwd+bwd / step"]
    headers += ["CUDA peak MiB"] if cuda else ["other procs CPU"]
    headers.append("note")
    table = []
    for row in rows:
        lora = _matched(rows, row, result["lora_by_m"])
        cells = [
            row["label"],
            fmt_int(row.get("trainable_params")),
            _time(row, metric),
            fmt_ratio(ratio(row, base_row(rows, row.get("compiled", False)), metric), spread=False),
            fmt_ratio(ratio(row, lora, metric)),
            fmt_ratio(ratio(row, by_key.get("ours_m1"), metric)) if row["kind"] == "stock" else "",
        ]
        if metric == "cpu_median_ms":
            cells += [_time(row, "median_ms"), fmt_ratio(ratio(row, lora, "median_ms"), spread=False)]
        ok = _ok(row)
        cells += [fmt_mib(row.get("rss_delta_bytes")) if ok else "—", fmt_mib(row.get("saved_bytes")) if ok else "—"]
        syncs = (row.get("host_syncs_fwd_bwd"), row.get("host_syncs_step"))
        cells.append("—" if not ok or syncs[0] is None else f"{syncs[0]} / {syncs[1]}")
        if cuda:
            cells.append(fmt_mib(row.get("cuda_peak_bytes")) if ok else "—")
        else:
            share = row.get("other_cpu_share") if ok else None
            cells.append("—" if share is None else f"{share:.0%}")
        cells.append(_note(row))
        table.append(cells)
    return markdown_table(headers, table)


def summary_table(runs: list[dict], model: str, cuda: bool) -> str:
    """Headline ratios of one model across thread counts (and wall time next to CPU time on the CPU)."""
    selected = [run for run in runs if run["result"]["case"]["model"] == model]
    headers = ["ratio (median of medians [paired min–max])"]
    columns: list[tuple[dict, str]] = []
    for run in selected:
        if cuda:
            columns.append((run, "median_ms"))
            headers.append("CUDA time")
        else:
            columns += [(run, "cpu_median_ms"), (run, "median_ms")]
            headers += [f"{run['threads']} thread(s), CPU time", f"{run['threads']} thread(s), wall"]
    names: list[str] = []
    for run, metric in columns:
        for name in key_ratios(run["result"], metric):
            if name not in names:
                names.append(name)
    names.sort(key=lambda n: (n.startswith("stock"), "/ base" in n, n))
    ratios = [key_ratios(run["result"], metric) for run, metric in columns]
    table = [[name] + [fmt_ratio(column.get(name)) for column in ratios] for name in names]
    return markdown_table(headers, table)


def layer_table(result: dict, metric: str) -> str:
    """Per-layer case: time and, above all, measured memory (peak ΔRSS and saved activations) over the base."""
    rows, by_key = result["rows"], _by_key(result["rows"])
    base = by_key.get("base", {})
    headers = ["method", "trainable params", "CPU ms median" if metric == "cpu_median_ms" else "ms median"]
    headers += ["× matched LoRA", "peak ΔRSS MiB", "ΔRSS − base", "saved act. MiB", "saved − base", "note"]
    table = []
    for row in rows:
        ok = _ok(row)
        lora = lora_row(rows, result["lora_by_m"], row["m"]) if row["kind"] in ("ours", "stock") else None
        rss = row.get("rss_delta_bytes") if ok else None
        saved = row.get("saved_bytes") if ok else None
        table.append(
            [
                row["label"],
                fmt_int(row.get("trainable_params")),
                fmt_ms(row.get(metric)) if ok else "—",
                fmt_ratio(ratio(row, lora, metric)),
                fmt_mib(rss),
                fmt_mib(rss - base["rss_delta_bytes"]) if rss is not None and _ok(base) else "—",
                fmt_mib(saved),
                fmt_mib(saved - base["saved_bytes"]) if saved is not None and _ok(base) else "—",
                _note(row),
            ]
        )
    return markdown_table(headers, table)


def extra_memory(result: dict) -> dict[str, dict[str, float | None]]:
    """Per ours m: (ours − base) / (matched LoRA − base) for peak ΔRSS and for saved activations."""
    rows, by_key = result["rows"], _by_key(result["rows"])
    base = by_key.get("base")
    out = {}
    for row in rows:
        if row["kind"] != "ours" or not _ok(row) or not _ok(base):
            continue
        lora = lora_row(rows, result["lora_by_m"], row["m"])
        entry = {}
        for key in ("rss_delta_bytes", "saved_bytes"):
            den = lora[key] - base[key] if _ok(lora) else None
            entry[key] = (row[key] - base[key]) / den if den and den > 0 else None
        out[f"m={row['m']}"] = entry
    return out


def layer_summary_table(layers: list[dict], metric: str = "cpu_median_ms") -> str:
    """One line per layer case: ours m / matched LoRA [paired spread], stock m=1 / ours m=1, and the extra saved
    activations and peak ΔRSS over the base of ours m=4 and of its matched LoRA (MiB, measured)."""
    headers = ["model", "layer", "tokens", "ours m=1 / LoRA", "ours m=2 / LoRA", "ours m=4 / LoRA"]
    headers += ["stock m=1 / ours m=1", "m=4 saved − base", "LoRA saved − base", "m=4 ΔRSS − base", "LoRA ΔRSS − base"]
    table = []
    for case in layers:
        rows, by_key = case["rows"], _by_key(case["rows"])
        ours = {row["m"]: row for row in rows if row["kind"] == "ours"}
        stock = next((row for row in rows if row["kind"] == "stock"), None)
        base = by_key.get("base")
        cells = [case["model"], case["title"].split(",")[0].removeprefix("Layer "), str(case["case"]["tokens"])]
        for m in (1, 2, 4):
            cells.append(fmt_ratio(ratio(ours.get(m), lora_row(rows, case["lora_by_m"], m), metric)))
        cells.append(fmt_ratio(ratio(stock, ours.get(1), metric)))
        lora4 = lora_row(rows, case["lora_by_m"], 4)
        for key in ("saved_bytes", "rss_delta_bytes"):
            for row in (ours.get(4), lora4):
                ok = _ok(row) and _ok(base)
                cells.append(fmt_mib(row[key] - base[key]) if ok else "—")
        table.append(cells)
    return markdown_table(headers, table, left=(0, 1))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.real_report outputs/bench_real_model.json``: the per-layer summary of a finished run."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", help="the --json file bench_real_model.py wrote")
    args = parser.parse_args(argv)
    with open(args.json) as handle:
        layers = json.load(handle).get("layers", [])
    print(layer_summary_table(layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
