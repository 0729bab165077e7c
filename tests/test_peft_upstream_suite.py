"""PEFT's own BOFT test cases (``tests/test_custom_models.py -k boft`` of the installed PEFT) with our tuner.

Runs ``tests/upstream/run_peft_boft_suite.py`` in a subprocess. That script downloads PEFT's sdist for the
installed version (cached under ``~/.cache/boft-plugin``), so this test is skipped when the sdist cannot be
obtained (no package registry and nothing cached). About 1.5 minutes on 2 cores once the sdist is cached.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "upstream" / "run_peft_boft_suite.py"
EXIT_UNAVAILABLE = 75  # run_peft_boft_suite.py: PEFT's sdist cannot be obtained
FETCH_TIMEOUT_S = 300
SUITE_TIMEOUT_S = 1200


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The inner pytest run must not inherit options or state meant for this (outer) run.
    for name in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "PYTEST_PLUGINS"):
        env.pop(name, None)
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.mark.slow
def test_peft_upstream_boft_cases_pass_with_our_tuner():
    try:
        fetch = subprocess.run(
            [sys.executable, str(SCRIPT), "--fetch-only", "--download-timeout", str(FETCH_TIMEOUT_S // 2 - 10)],
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT_S,
            env=_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"PEFT's sdist could not be downloaded within {FETCH_TIMEOUT_S} s (no registry access?)")
    if fetch.returncode == EXIT_UNAVAILABLE:
        pytest.skip(f"PEFT's sdist (test files) cannot be obtained, no registry access?\n{_tail(fetch.stderr, 15)}")
    assert fetch.returncode == 0, f"fetching PEFT's tests failed:\n{_tail(fetch.stdout + fetch.stderr)}"

    try:
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--", "-rfE"],
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT_S,
            env=_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        pytest.fail(f"PEFT's BOFT cases did not finish within {SUITE_TIMEOUT_S} s:\n{_tail(output)}")
    assert run.returncode == 0, (
        f"PEFT's BOFT cases with boft_plugin.register(): pytest exit code {run.returncode}\n"
        f"{_tail(run.stdout + run.stderr)}"
    )
