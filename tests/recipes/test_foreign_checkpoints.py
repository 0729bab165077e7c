"""Checkpoints the plugin did not write are never deleted or misread (docs/reliability.md, "Checkpoints").

A user's ``output_dir`` may hold stock Trainer checkpoints (their own TRL script), another run's, or DeepSpeed /
torch.distributed.checkpoint states from elsewhere. Here: resuming over stock checkpoints keeps them byte for byte
and continues from the newest; rotation only ever removes the run's own; a fresh run that would write over existing
checkpoints is refused before anything is written; pickled formats that this user's boft-plugin did not sign need
``trust_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from datasets import Dataset

import boft_plugin
from boft_plugin.cli import main as cli_main
from boft_plugin.errors import RecipeError
from boft_plugin.recipes.checkpoints.markers import (
    PENDING_MARKER,
    begin_checkpoint,
    complete_checkpoint,
    rotate,
    scan_checkpoints,
)
from boft_plugin.recipes.checkpoints.resume import plan_resume
from boft_plugin.testing.recipes import tiny_recipe, write_recipe, write_tiny_data
from boft_plugin.toy.models import char_tokenizer, tiny_llama
from boft_plugin.toy.tasks import sft_examples


def digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama(seed=0).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def stock_trl_checkpoints(base: Path, output_dir: Path) -> None:
    """What a user's own TRL script writes: boft_plugin.register() + SFTTrainer, checkpoints every 2 steps."""
    from peft import BOFTConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    boft_plugin.register()
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=32,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=args,
        train_dataset=Dataset.from_list(sft_examples(32, fmt="prompt_completion")),
        processing_class=char_tokenizer(),
        peft_config=BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    boft_plugin.unregister()


def recipe_over(base: Path, output_dir: Path, tmp_path: Path, **keys) -> str:
    data = write_tiny_data(tmp_path / "data")
    mapping = tiny_recipe(
        "sft",
        output_dir,
        data,
        tiny_model=False,
        model_name_or_path=str(base),
        boft_target_modules=["q_proj", "v_proj"],
        eval_strategy="no",
        eval_on_start=False,
        save_strategy="steps",
        save_steps=2,
        probe_text=None,
        **keys,
    )
    return write_recipe(tmp_path / "recipe.yaml", mapping)


def test_resume_over_stock_trainer_checkpoints_keeps_them_byte_for_byte(base, tmp_path, capsys):
    out = tmp_path / "out"
    stock_trl_checkpoints(base, out)
    before = {name: digest(out / name) for name in ("checkpoint-2", "checkpoint-4")}
    config = recipe_over(base, out, tmp_path, max_steps=6, save_total_limit=1, resume_from_checkpoint="true")
    assert cli_main(["sft", "--config", config]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-4'} (written without boft-plugin" in printed
    # the stock checkpoints are untouched (not removed by resume or by save_total_limit=1, not rewritten)
    assert {name: digest(out / name) for name in before} == before
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [2, 4, 6]  # steps 1-4 not trained again
    assert [c.path.name for c in scan_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_fresh_run_over_existing_checkpoints_is_refused_before_anything_is_written(base, tmp_path, capsys):
    out = tmp_path / "out"
    stock_trl_checkpoints(base, out)
    before = digest(out)
    config = recipe_over(base, out, tmp_path, max_steps=4)
    assert cli_main(["sft", "--config", config]) == 2
    error = capsys.readouterr().err
    assert "holds checkpoints (checkpoint-2, checkpoint-4) and this run starts afresh" in error, error
    assert "resume_from_checkpoint: auto" in error and "overwrite_output_dir: true" in error
    assert digest(out) == before  # nothing written, not even the run lock


def _own(path: Path, lineage: str, complete: bool = True, step_state: bool = True) -> None:
    nonce = begin_checkpoint(path, lineage)
    if step_state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}))
    if complete:
        complete_checkpoint(path, lineage, nonce, world_size=1)


def _stock(path: Path, deepspeed: bool = False) -> None:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}))
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    if deepspeed:
        (path / "latest").write_text("global_step4")
        (path / "global_step4").mkdir()
        (path / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"pickle")
    else:
        (path / "optimizer.pt").write_bytes(b"o")
        (path / "scheduler.pt").write_bytes(b"s")


def test_rotation_removes_only_the_runs_own_checkpoints(tmp_path):
    _stock(tmp_path / "checkpoint-1")
    _own(tmp_path / "checkpoint-2", "other-run")
    (tmp_path / "checkpoint-3").mkdir()  # unmarked and incomplete: another tool's
    for step in (4, 6, 8):
        _own(tmp_path / f"checkpoint-{step}", "this-run")
    _own(tmp_path / "checkpoint-5", "this-run", complete=False)  # this run's, killed while writing
    removed = rotate(tmp_path, keep=1, lineage="this-run")
    assert sorted(p.name for p in removed) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-8",
    ]


def test_resume_removes_only_its_own_unfinished_checkpoints_and_refuses_others(tmp_path):
    _own(tmp_path / "checkpoint-2", "run-a")
    _own(tmp_path / "checkpoint-4", "run-a", complete=False)
    plan = plan_resume("auto", tmp_path)
    assert plan.checkpoint == str(tmp_path / "checkpoint-2") and plan.remove == [str(tmp_path / "checkpoint-4")]
    (tmp_path / "checkpoint-6").mkdir()  # newer, unmarked: the resumed run would write over it at step 6
    with pytest.raises(RecipeError, match="holds checkpoint-6 newer than checkpoint-2, which it resumes"):
        plan_resume("auto", tmp_path)
    assert plan_resume("auto", tmp_path, overwrite=True).remove == [str(tmp_path / "checkpoint-4")]
    assert (tmp_path / "checkpoint-6").is_dir()  # planning never removes anything


def test_an_unfinished_stock_checkpoint_is_skipped_and_the_newest_complete_one_resumed(tmp_path):
    _stock(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"half")  # the Trainer was killed here
    with pytest.raises(RecipeError, match="holds checkpoint-4 newer than checkpoint-2, which it resumes"):
        plan_resume("auto", tmp_path)
    with pytest.raises(RecipeError, match="checkpoint-4 is not a complete checkpoint .*trainer_state.json"):
        plan_resume(str(tmp_path / "checkpoint-4"), tmp_path)


def test_pickled_checkpoints_need_trust_unless_signed_for_this_user(tmp_path):
    _stock(tmp_path / "checkpoint-4", deepspeed=True)
    with pytest.raises(RecipeError, match="would be unpickled to resume .*global_step4/.*trust_checkpoint: true"):
        plan_resume("auto", tmp_path)
    plan = plan_resume("auto", tmp_path, trust=True)
    assert plan.checkpoint == str(tmp_path / "checkpoint-4") and not plan.trusted

    own = tmp_path / "own" / "checkpoint-4"
    _stock(own, deepspeed=True)
    nonce = begin_checkpoint(own, "run-a")
    complete_checkpoint(own, "run-a", nonce, world_size=2)
    assert plan_resume("auto", own.parent).trusted  # signed by this user's key: no key needed
    (own / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"another pickle")  # swapped file
    with pytest.raises(RecipeError, match="its completion marker does not verify for this user"):
        plan_resume("auto", own.parent)


def test_a_checkpoint_started_again_is_not_complete(tmp_path):
    path = tmp_path / "checkpoint-2"
    _own(path, "run-a")
    begin_checkpoint(path, "run-a")  # the same step written again (overwrite_output_dir): pending, new nonce
    assert (path / PENDING_MARKER).is_file() and not scan_checkpoints(tmp_path)[0].complete


def test_signing_key_is_private_to_the_user(tmp_path, monkeypatch):
    from boft_plugin.recipes.checkpoints.signing import KEY_ENV, key_file

    monkeypatch.setenv(KEY_ENV, str(tmp_path / "keys" / "k"))
    _own(tmp_path / "run" / "checkpoint-2", "run-a")
    assert key_file().stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "keys" / "another-users-key"))
    assert not scan_checkpoints(tmp_path / "run")[0].signed


class _FakeHub:
    """Stands in for the Hub: records what would be uploaded (no network here)."""

    uploads: list[dict] = []

    def create_repo(self, name, **kwargs):
        return type("Repo", (), {"repo_id": name})()

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)


def test_push_to_hub_uploads_the_adapter_and_tokenizer_only(tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    from boft_plugin.recipes import parse_recipe, run

    monkeypatch.setattr("transformers.trainer.hf_api", lambda: _FakeHub())
    _FakeHub.uploads.clear()
    data = write_tiny_data(tmp_path / "data")
    out = tmp_path / "out"
    mapping = tiny_recipe("sft", out, data, max_steps=2, eval_strategy="no", eval_on_start=False, export_merged=True)
    mapping.update(push_to_hub=True, hub_model_id="someone/boft-run", hub_strategy="end")
    run(parse_recipe("sft", config=mapping))
    (upload,) = _FakeHub.uploads
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    sent = sorted(
        filter_repo_objects(files, allow_patterns=upload["allow_patterns"], ignore_patterns=upload["ignore_patterns"])
    )
    assert "adapter_model.safetensors" in sent and "adapter_config.json" in sent and "tokenizer_config.json" in sent
    assert not [f for f in sent if f.startswith(("merged/", "base_model/", "checkpoint-", "."))], sent
    assert "probe_logits.pt" not in sent and "boft_run_summary.json" not in sent
