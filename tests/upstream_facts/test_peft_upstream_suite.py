"""PEFT's own BOFT test cases (``tests/test_custom_models.py -k boft`` of the installed PEFT) with our tuner.

Runs ``tests/workers/run_peft_boft_suite.py`` in a subprocess. That script downloads PEFT's sdist for the
installed version (cached under ``~/.cache/boft-plugin``). Outside CI the test is skipped when the sdist cannot be
obtained (no package registry and nothing cached); in CI (``CI=true``, set by ``.ci/run``) that is a failure, so
the suite cannot silently vanish. The counts come from the inner run's JUnit report: no failure, no error, every
collected case passed or skipped by PEFT itself, and at least ``MIN_PASSED`` passed (681 with peft 0.21.2).
About 1.5 minutes on 2 cores once the sdist is cached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from boft_plugin.testing.paths import WORKERS

SCRIPT = WORKERS / "run_peft_boft_suite.py"
EXIT_UNAVAILABLE = 75  # run_peft_boft_suite.py: PEFT's sdist cannot be obtained
FETCH_TIMEOUT_S = 300
SUITE_TIMEOUT_S = 1200
MIN_PASSED = (
    650  # peft 0.21.2 has 681 passing BOFT cases (13 skipped by PEFT itself); a big drop means a vanished suite
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI must run PEFT's upstream BOFT cases, but: {reason}")
    pytest.skip(reason)


def junit_counts(path: Path) -> dict[str, int]:
    """Totals of a pytest JUnit XML report: tests, failures, errors, skipped, passed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {
        key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return totals


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The inner pytest run must not inherit options or state meant for this (outer) run.
    for name in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "PYTEST_PLUGINS"):
        env.pop(name, None)
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.mark.slow
def test_peft_upstream_boft_cases_pass_with_our_tuner(tmp_path):
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
        _unavailable(f"PEFT's sdist could not be downloaded within {FETCH_TIMEOUT_S} s (no registry access?)")
    if fetch.returncode == EXIT_UNAVAILABLE:
        _unavailable(f"PEFT's sdist (test files) cannot be obtained, no registry access?\n{_tail(fetch.stderr, 15)}")
    assert fetch.returncode == 0, f"fetching PEFT's tests failed:\n{_tail(fetch.stdout + fetch.stderr)}"

    try:
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--", "-rfE", f"--junitxml={tmp_path / 'upstream.xml'}"],
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
    counts = junit_counts(tmp_path / "upstream.xml")
    print("PEFT's upstream BOFT cases with boft_plugin:", counts)
    assert counts["failures"] == 0 and counts["errors"] == 0, counts
    assert counts["passed"] + counts["skipped"] == counts["tests"], counts
    assert counts["passed"] >= MIN_PASSED, counts


def test_junit_counts_reads_a_report(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    assert junit_counts(report) == {"tests": 10, "failures": 1, "errors": 0, "skipped": 2, "passed": 7}
