"""Ranks that do not share what they write never hang and never diverge silently (docs/reliability.md).

- A multi-node run whose nodes see different ``output_dir`` directories (node-local disks) is refused on every rank
  before anything is loaded: markers, rotation and exports would happen on rank 0's disk only.
- An export that fails on rank 0 (no staging directory, or an error that cannot be pickled) raises on every rank,
  none waits in a collective.
"""

from __future__ import annotations

import re

import pytest

from boft_plugin.runtime.launchers import free_port, launch, torchrun_cmd
from boft_plugin.testing.paths import WORKERS
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data

pytestmark = pytest.mark.distributed
TIMEOUT = 240


def test_nodes_that_do_not_share_output_dir_are_refused(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe("sft", tmp_path / "unused", data, max_steps=2))
    port = free_port()
    nodes = [
        torchrun_cmd(
            ["boft_plugin", "sft", "--config", config, "--output_dir", str(tmp_path / f"node{n}-disk" / "out")],
            nproc_per_node=1,
            nnodes=2,
            node_rank=n,
            master_port=port,
            module=True,
        )
        for n in (0, 1)
    ]
    result = launch(nodes, timeout=TIMEOUT)
    assert result.returncode != 0 and not result.timed_out, result.output[-3000:]
    assert result.output.count("is not the same directory on every node (rank 1 on") == 2  # both ranks say so
    assert not (tmp_path / "node0-disk" / "out").exists()  # refused: the lock is released, the new dir removed


@pytest.mark.parametrize("case", ["staging", "unpicklable", "lora_svd"])
def test_an_export_failing_on_rank_0_raises_on_every_rank(tmp_path, case):
    cmd = torchrun_cmd([str(WORKERS / "failed_export_worker.py"), case, str(tmp_path / "out")], nproc_per_node=2)
    result = launch(cmd, timeout=TIMEOUT)
    assert not result.timed_out, result.output[-3000:]
    raised = dict(re.findall(r"rank (\d): raised (\w+): ", result.output))
    assert set(raised) == {"0", "1"}, result.output[-3000:]
    if case == "staging":
        assert raised == {"0": "NotADirectoryError", "1": "NotADirectoryError"}
    elif case == "lora_svd":
        assert raised == {"0": "RuntimeError", "1": "RuntimeError"}
        assert result.output.count("RuntimeError: SVD did not converge (layer 2)") >= 2  # rank 1 raises rank 0's error
        assert not (tmp_path / "out" / "lora").exists()
    else:
        assert raised["0"] == "LocalError" and raised["1"] == "BoftExportError"
        assert "rank 0 failed: LocalError: disk full while writing" in result.output
