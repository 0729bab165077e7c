"""Shared fixtures: PEFT's own routing around every test, ``registered``, and the launch retry policy.

Shared helpers (models, recipes, paths) live in :mod:`boft_plugin.testing`.
"""

from __future__ import annotations

import os

import pytest

import boft_plugin
from boft_plugin.runtime.launchers import ATTEMPTS_ENV


def pytest_configure(config):
    # A launch that hangs (rare on a loaded 2-core machine: gloo on loopback) is stopped at its timeout with the
    # workers' stacks and started once more; the stacks reach the warnings summary (boft_plugin.runtime.launchers.run).
    os.environ.setdefault(ATTEMPTS_ENV, "2")


@pytest.fixture(autouse=True)
def _restore_peft_routing():
    """Every test starts and ends with PEFT's own routing, whatever it did in between."""
    boft_plugin.unregister()
    yield
    boft_plugin.unregister()


@pytest.fixture
def registered():
    boft_plugin.register()
    yield
    boft_plugin.unregister()
