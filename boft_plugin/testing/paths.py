"""Where a checkout keeps what the tests and benchmarks start in other processes (tests run from a checkout)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = REPO / "tests" / "workers"  # scripts the tests run in other processes (ranks, fresh reloads)
INTEGRATIONS = REPO / "integrations"
DOCS = REPO / "docs"

__all__ = ["DOCS", "INTEGRATIONS", "REPO", "WORKERS"]
