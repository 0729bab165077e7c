"""docs/refused_inputs.md is what the refused inputs really print: every case is run again and compared."""

from __future__ import annotations

import pytest

from boft_plugin.testing.paths import DOCS
from boft_plugin.testing.refused_inputs import HEADER, table

pytestmark = pytest.mark.timeout(300)

DOC = DOCS / "refused_inputs.md"


def test_the_documented_table_is_what_each_refused_input_prints(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert DOC.read_text().strip() == (HEADER + table()).strip(), (
        "regenerate: python -m boft_plugin.testing.refused_inputs > docs/refused_inputs.md"
    )
