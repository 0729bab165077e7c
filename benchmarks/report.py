"""Markdown tables of the benchmark rows, with the ratios to the frozen base, matched LoRA and stock PEFT."""

from __future__ import annotations

from .common import fmt_int, fmt_mib, fmt_ms, fmt_ratio, markdown_table

_KIND_ORDER = {"base": 0, "lora": 1, "oft": 2, "ours": 3, "stock": 4}


def add_ratios(rows: list[dict], lora_by_m: dict[int, str], metric: str = "median_ms") -> None:
    """Sort the rows (in place; base, LoRA, OFT, ours, stock, by m) and annotate each with its ratios.

    ``lora_by_m[m]`` = key of the LoRA method matched to BOFT with m factors; ``metric`` is the time compared
    (``median_ms``: wall; ``cpu_median_ms``: process CPU time).
    """
    rows.sort(key=lambda row: (row.get("compiled", False), _KIND_ORDER[row["kind"]], row["m"], row.get("r", 0)))
    by_key = {row["method"]: row for row in rows}

    def median(key: str | None) -> float | None:
        row = by_key.get(key) if key else None
        return row.get(metric) if row and row.get("status") == "ok" else None

    base = median("base")
    for row in rows:
        t = row.get(metric) if row.get("status") == "ok" else None
        kind, m = row["kind"], row["m"]
        lora_key = None
        if kind in ("ours", "stock"):
            lora_key = lora_by_m.get(m)
        elif kind == "oft":
            lora_key = lora_by_m.get(min(lora_by_m)) if lora_by_m else None
        stock_key = f"stock_m{m}" if kind in ("ours", "stock") else None
        row["lora_ref"] = lora_key
        row["ratio_base"] = _ratio(t, base)
        row["ratio_lora"] = _ratio(t, median(lora_key))
        row["ratio_stock"] = _ratio(t, median(stock_key))
        if kind == "ours" and by_key.get(stock_key, {}).get("status") == "skipped":
            row["stock_note"] = "stock skipped"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 4)


def _fmt_ratio_value(value: float | None) -> str:
    return fmt_ratio(value, 1.0) if value is not None else "—"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:,.0f}"


def _note(row: dict, by_key: dict[str, dict]) -> str:
    if row.get("status") != "ok":
        return row.get("note", row.get("status", ""))
    notes = []
    if row["kind"] == "lora":
        notes.append(f"matched to BOFT m={row['m']}: {row['matched_boft_params']:,} params")
    if row["kind"] == "oft" and row.get("lora_ref") in by_key:
        notes.append(f"×LoRA vs r={by_key[row['lora_ref']].get('r')}")
    if row["kind"] == "stock" and "est_step_s" in row:
        notes.append(f"est. was {_fmt_s(row['est_step_s'])} s/step")
    if row.get("stock_note"):
        notes.append(row["stock_note"])
    return "; ".join(notes)


def case_table(rows: list[dict], cuda: bool, saved_delta: bool = False, metric: str = "median_ms") -> str:
    """One markdown table for the rows of one case (one layer shape / tokens / b, or the whole model)."""
    by_key = {row["method"]: row for row in rows}
    base_saved = by_key.get("base", {}).get("saved_bytes")
    time_header = "step ms (median)" if metric == "median_ms" else "CPU ms/step (median)"
    headers = ["method", "trainable params", time_header, "× base", "× LoRA", "× stock (same m)"]
    headers += ["peak ΔRSS MiB", "saved act. MiB"]
    if saved_delta:
        headers.append("saved − base MiB")
    if cuda:
        headers.append("CUDA peak MiB")
    else:
        headers.append("other procs CPU")
    headers.append("note")
    table = []
    for row in rows:
        ok = row.get("status") == "ok"
        cells = [
            row["label"],
            fmt_int(row.get("trainable_params")),
            fmt_ms(row.get(metric)) if ok else "—",
            _fmt_ratio_value(row.get("ratio_base")),
            _fmt_ratio_value(row.get("ratio_lora")),
            _fmt_ratio_value(row.get("ratio_stock")),
            fmt_mib(row.get("rss_delta_bytes")) if ok else "—",
            fmt_mib(row.get("saved_bytes")) if ok else "—",
        ]
        if saved_delta:
            delta = row["saved_bytes"] - base_saved if ok and base_saved is not None else None
            cells.append("—" if delta is None else f"{delta / 2**20:,.1f}")
        if cuda:
            cells.append(fmt_mib(row.get("cuda_peak_bytes")) if ok else "—")
        else:
            share = row.get("other_cpu_share") if ok else None
            cells.append("—" if share is None else f"{share:.0%}")
        cells.append(_note(row, by_key))
        table.append(cells)
    return markdown_table(headers, table)
