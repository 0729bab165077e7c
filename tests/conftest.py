"""Shared fixtures: PEFT's own routing around every test, ``registered``, ``one_rank_group`` (a gloo group of one
process, for FSDP2 in the test process), and the launch retry policy.

Shared helpers (models, recipes, paths) live in :mod:`boft_plugin.testing`.
"""

from __future__ import annotations

import os

import pytest

import boft_plugin
from boft_plugin.runtime.launchers import ATTEMPTS_ENV, free_port


def pytest_configure(config):
    # A launch that hangs (rare on a loaded 2-core machine: gloo on loopback) is stopped at its timeout with the
    # workers' stacks and started once more; the stacks reach the warnings summary
    # (boft_plugin.runtime.launchers.launch).
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


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
