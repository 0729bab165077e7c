"""A finished distributed rank leaves without interpreter teardown (boft_plugin.runtime.process_exit).

The fact behind it, checked here so that a torch upgrade that fixes it is noticed: after a DDP backward,
``destroy_process_group()`` leaves the gloo process group's threads running, so they would be torn down during
interpreter finalisation (which sometimes aborts a rank that finished its work).
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from boft_plugin.runtime.launchers import launch, torchrun_cmd

pytestmark = pytest.mark.distributed

WORKER = textwrap.dedent(
    """
    import atexit, json, os, sys, torch, torch.distributed as dist
    from boft_plugin.runtime.process_exit import exit_after_distributed_run, launched_distributed

    def gloo_threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return names.count("pt_gloo_runloop")

    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.ones(2, 4)).sum().backward()
    del model
    report = {"rank": int(os.environ["RANK"]), "launched_distributed": launched_distributed()}
    if sys.argv[1] == "ok":  # "fail" leaves the group up: the helper must destroy it before the handlers run
        dist.destroy_process_group()
        report["gloo_threads_after_destroy"] = gloo_threads()
    # one write per line (a print of several values is several writes, and the two ranks share the pipe)
    atexit.register(lambda: print(f"ATEXIT {os.environ['RANK']} group up: {dist.is_initialized()}\\n", end=""))
    print("REPORT " + json.dumps(report), end="")  # no newline: the flush on exit must still deliver it
    exit_after_distributed_run(3 if sys.argv[1] == "fail" else 0)
    raise AssertionError("exit_after_distributed_run returned")
    """
)


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_finished_rank_exits_with_its_code_after_atexit_handlers(tmp_path, outcome):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = launch(torchrun_cmd([str(script), outcome], nproc_per_node=2), timeout=120, attempts=1)
    assert (result.returncode == 0) == (outcome == "ok"), result.output[-3000:]
    decoder = json.JSONDecoder()
    reports = [decoder.raw_decode(chunk)[0] for chunk in result.output.split("REPORT ")[1:]]
    assert sorted(r["rank"] for r in reports) == [0, 1], result.output[-3000:]
    assert all(r["launched_distributed"] for r in reports)
    assert result.output.count("ATEXIT") == 2  # handlers ran before os._exit, after the group was destroyed
    assert result.output.count("group up: False") == 2, result.output[-3000:]
    assert "returned" not in result.output
    if outcome == "ok":
        # the torch 2.13 behaviour that makes this necessary; if this fails, torch frees the group now (module doc)
        assert all(r["gloo_threads_after_destroy"] == 2 for r in reports), reports


def test_one_process_is_not_distributed(monkeypatch):
    from boft_plugin.runtime.process_exit import launched_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")  # not a number: one process, as the recipe check reads it
    assert not launched_distributed()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_distributed()


def test_cli_ranks_end_through_it_with_their_exit_code(tmp_path):
    """``boft-plugin sft`` on 2 ranks with a recipe refused up front: the rank says why and exits 2."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {tmp_path / 'no-such-model'}\noutput_dir: {tmp_path / 'out'}\n")
    cmd = torchrun_cmd(["boft_plugin", "sft", "--config", str(recipe)], nproc_per_node=2, module=True)
    result = launch(cmd, timeout=180, attempts=1)
    assert result.returncode != 0
    assert "boft-plugin sft: error: no training data" in result.output, result.output[-3000:]
    # torchrun's report of the first rank to end (it stops the other one then)
    assert re.search(r"exitcode\s*:\s*2\b", result.output), result.output[-3000:]
