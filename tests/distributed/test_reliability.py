"""Kill-and-resume and world-size changes with real launcher process trees (gloo, 127.0.0.1).

One uninterrupted reference run (DDP, 2 ranks, global batch 8, 8 steps) gives the adapter every interrupted run
must reach. The training set has 21 rows, not a multiple of the global batch, so every run crosses several epoch
ends with a partial last batch: the data order must not depend on the number of ranks (recipes/data_order.py).
The interrupted runs are SIGKILLed (the whole launcher process tree) during a checkpoint save or
during a training step, and resumed with ``resume_from_checkpoint: auto`` (the newest complete checkpoint), on
the same or another number of ranks (gradient accumulation keeps the global batch at 8).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from boft_plugin.export.loading import read_adapter
from boft_plugin.recipes.checkpoints.markers import is_complete, last_complete_checkpoint
from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import REPO, WORKERS
from boft_plugin.testing.recipes import tiny_recipe, write_tiny_data

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1500)]

TIMEOUT = 420
GLOBAL_BATCH = 8


def recipe(tmp_path: Path, name: str, data: dict, world: int, **extra) -> str:
    per_device = 4 if world <= 2 else 2
    mapping = tiny_recipe(
        "sft",
        tmp_path / name,
        data,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        eval_strategy="no",
        eval_on_start=False,
        logging_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=GLOBAL_BATCH // (per_device * world),
        resume_from_checkpoint="auto",
        probe_text=None,
        **extra,
    )
    path = tmp_path / f"{name}-w{world}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def command(config: str, world: int, engine: str, slow_commit: bool = False) -> list[str]:
    """The launch of ``boft-plugin sft``; ``slow_commit``: through tests/workers/slow_commit.py, whose completion
    markers come 5 s late (a window in which the test kills the run while a checkpoint is being committed)."""
    args = ["sft", "--config", config]
    script = [str(WORKERS / "slow_commit.py"), *args] if slow_commit else ["-m", "boft_plugin", *args]
    if engine in ("zero2", "zero3"):
        return accelerate_cmd(str(REPO / f"integrations/accelerate/{engine}.yaml"), script, num_processes=world)
    if world == 1:
        return [sys.executable, *script]
    return torchrun_cmd(script[1:] if not slow_commit else script, nproc_per_node=world, module=not slow_commit)


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a launcher and every process under it; returns how many processes were killed."""
    victims = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return len(victims)


def run_and_kill(cmd: list[str], when, env: dict | None = None, log: Path | None = None) -> int:
    """Start ``cmd``; SIGKILL its process tree as soon as ``when()`` is true. Returns the number killed."""
    sink = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, cwd=str(REPO), env=env or cpu_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not when():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (exit {proc.returncode}) before the kill point")
            if time.monotonic() > deadline:
                raise AssertionError("kill point not reached in time")
            time.sleep(0.01)
        return kill_tree(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        if log:
            sink.close()


def resume(cmd: list[str], what: str) -> str:
    return launch(cmd, timeout=TIMEOUT, env=cpu_env(), cwd=str(REPO)).check(what).output


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(out: Path, reference: Path) -> None:
    got, want = adapter(out), adapter(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=2e-5, rtol=1e-4), key


def complete_checkpoints_intact(out: Path) -> list[int]:
    """Every complete checkpoint's adapter still reads (nothing complete was lost or damaged)."""
    steps = []
    for path in sorted(out.glob("checkpoint-*")):
        if is_complete(path):
            read_adapter(path)
            steps.append(int(path.name.split("-")[1]))
    return steps


def ckpt_written(out: Path, step: int):
    """The Trainer has written checkpoint-N (its trainer state, written last), not yet marked complete."""
    return lambda: (out / f"checkpoint-{step}" / "trainer_state.json").is_file()


def ckpt_complete(out: Path, step: int, then: float = 0.0):
    state = {}

    def ready():
        if is_complete(out / f"checkpoint-{step}"):
            state.setdefault("at", time.monotonic())
            return time.monotonic() - state["at"] >= then
        return False

    return ready


TRAIN_ROWS = 21  # 2 full global batches of 8 and 5 rows left at every epoch's end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"), n_sft=TRAIN_ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    resume(command(recipe(tmp, "out", data, 2), 2, "ddp"), "uninterrupted reference")
    out = tmp / "out"
    assert complete_checkpoints_intact(out) == [6, 8]  # save_total_limit 2, counted on complete checkpoints
    return out


def test_ddp_kill_during_save_and_step_resume_on_1_then_2_ranks(tmp_path, data, reference):
    out = tmp_path / "out"
    # 1. two ranks, killed while checkpoint-4 is being committed: checkpoint-2 is the last complete one
    killed = run_and_kill(command(recipe(tmp_path, "out", data, 2), 2, "ddp", slow_commit=True), ckpt_written(out, 4))
    assert killed >= 3  # the launcher and its two ranks
    assert last_complete_checkpoint(out).name == "checkpoint-2" and not is_complete(out / "checkpoint-4")
    assert complete_checkpoints_intact(out) == [2]
    # 2. resumed on ONE rank (gradient accumulation 2), killed during a step after checkpoint-6 completed
    log = tmp_path / "second.log"
    run_and_kill(command(recipe(tmp_path, "out", data, 1), 1, "ddp"), ckpt_complete(out, 6), log=log)
    assert f"resuming from {out / 'checkpoint-2'} (removing this run's unfinished checkpoint-4)" in log.read_text()
    assert not (out / "adapter_model.safetensors").exists() and not is_complete(out / "checkpoint-8")
    assert complete_checkpoints_intact(out) == [4, 6]
    # 3. resumed on two ranks again, to the end: the same adapter as the uninterrupted run
    output = resume(command(recipe(tmp_path, "out", data, 2), 2, "ddp"), "final resume")
    assert f"resuming from {out / 'checkpoint-6'}" in output
    assert_same_adapter(out, reference)
    assert complete_checkpoints_intact(out) == [6, 8]


def test_zero3_kill_during_save_resume_on_1_then_2_ranks(tmp_path, data, reference):
    """ZeRO-3 partitions the optimizer per rank: another world size resumes through the universal format."""
    out = tmp_path / "out"
    # 1. two ranks, killed while checkpoint-6 is being committed
    run_and_kill(command(recipe(tmp_path, "out", data, 2), 2, "zero3", slow_commit=True), ckpt_written(out, 6))
    assert last_complete_checkpoint(out).name == "checkpoint-4"
    # 2. resumed on ONE rank: checkpoint-4 (2 ranks) is converted to DeepSpeed's universal format; killed during
    #    a step after checkpoint-6 completed
    log = tmp_path / "second.log"
    run_and_kill(command(recipe(tmp_path, "out", data, 1), 1, "zero3"), ckpt_complete(out, 6), log=log)
    text = log.read_text()
    assert f"resuming from {out / 'checkpoint-4'} (removing this run's unfinished checkpoint-6)" in text
    assert "written by 2 ranks, resuming on 1: loading it through DeepSpeed's universal checkpoint format" in text
    assert (out / "checkpoint-4" / "global_step4").is_dir()  # the original shards are kept as they were
    # 3. back on two ranks to the end (checkpoint-6 was written by one rank): the uninterrupted run's adapter
    output = resume(command(recipe(tmp_path, "out", data, 2), 2, "zero3"), "ZeRO-3 resume on 2 ranks")
    assert f"resuming from {out / 'checkpoint-6'}" in output and "written by 1 rank, resuming on 2" in output
    assert_same_adapter(out, reference)
    assert complete_checkpoints_intact(out) == [6, 8]


def test_zero2_kill_during_step_resume_on_1_rank(tmp_path, data, reference):
    """ZeRO-2 partitions gradients and optimizer state: 2 ranks -> 1 rank through the universal format too."""
    out = tmp_path / "out"
    run_and_kill(command(recipe(tmp_path, "out", data, 2), 2, "zero2"), ckpt_complete(out, 4))
    last = last_complete_checkpoint(out)
    assert last is not None and last.name in ("checkpoint-4", "checkpoint-6")
    output = resume(command(recipe(tmp_path, "out", data, 1), 1, "zero2"), "ZeRO-2 resume on 1 rank")
    assert f"resuming from {last}" in output and "written by 2 ranks, resuming on 1" in output
    assert_same_adapter(out, reference)


def test_fsdp2_kill_during_step_on_4_ranks_resume_on_2(tmp_path, data, reference):
    out = tmp_path / "out"
    run_and_kill(command(recipe(tmp_path, "out", data, 4, fsdp2_pre_shard=True), 4, "fsdp2"), ckpt_complete(out, 4))
    last = last_complete_checkpoint(out)
    assert last is not None and (last / "fsdp2_dcp").is_dir()
    output = resume(command(recipe(tmp_path, "out", data, 2, fsdp2_pre_shard=True), 2, "fsdp2"), "FSDP2 on 2 ranks")
    assert f"resuming from {last}" in output
    assert_same_adapter(out, reference)


def test_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    from boft_plugin.errors import RecipeError
    from boft_plugin.recipes.checkpoints.markers import begin_checkpoint, complete_checkpoint
    from boft_plugin.recipes.checkpoints.resume import carry_out, plan_resume

    for step, complete in ((2, True), (4, True), (6, False)):
        path = tmp_path / f"checkpoint-{step}"
        nonce = begin_checkpoint(path, "run-a")
        (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        if complete:
            complete_checkpoint(path, "run-a", nonce, world_size=1)
    with pytest.raises(RecipeError, match="checkpoint-6 is incomplete"):
        plan_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    plan = plan_resume("auto", tmp_path)
    assert plan.checkpoint == str(tmp_path / "checkpoint-4") and plan.lineage == "run-a"
    carry_out(plan, writer=True)
    assert not (tmp_path / "checkpoint-6").exists()  # removed so that the resumed run can write it again
    assert (tmp_path / "checkpoint-2").is_dir()
