"""Real multi-process runs on the CPU (gloo, 127.0.0.1): every engine trains what one process trains.

Each engine run trains a tiny Llama (biases on) with BOFT m = 2 and m = 4 for a few steps on one global batch,
exports the adapter and a merged model, and is compared with the one-process reference: losses, exported
tensors, per-rank shares, and a fresh-process reload with stock PEFT / plain transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boft_plugin.runtime.launchers import cpu_env, launch, torchrun_cmd
from boft_plugin.testing.paths import WORKERS
from boft_plugin.toy.models import tiny_llama

pytestmark = pytest.mark.distributed

WORKER = str(WORKERS / "train_worker.py")
RELOAD = str(WORKERS / "reload_check.py")
TIMEOUT = 300  # a run takes 10-40 s here; two attempts (conftest) fit in the 1200 s per test


def _launch(engine: str, base: Path, out: Path, nproc: int = 2, extra: tuple[str, ...] = ()) -> None:
    args = [WORKER, "--engine", engine, "--base", str(base), "--out", str(out), *extra]
    if engine == "single":
        launch([sys.executable, *args], timeout=TIMEOUT).check(f"{engine} run")
    else:
        launch(torchrun_cmd(args, nproc_per_node=nproc), timeout=TIMEOUT).check(f"{engine} run")


def _save_base(path: Path, **overrides) -> Path:
    tiny_llama(seed=3, attention_bias=True, mlp_bias=True, **overrides).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _save_base(tmp_path_factory.mktemp("base"), hidden_size=64, intermediate_size=96)


@pytest.fixture(scope="module")
def reference(base_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _launch("single", base_dir, out)
    return out


def _compare_with_reference(run_dir: Path, reference: Path, factors: int) -> dict:
    ours, ref = run_dir / f"m{factors}", reference / f"m{factors}"
    result = json.loads((ours / "result.json").read_text())
    expected = json.loads((ref / "result.json").read_text())
    assert result["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    assert result["losses"][-1] < result["losses"][0]
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        got, want = load_file(ours / name), load_file(ref / name)
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.allclose(got[key], want[key], atol=5e-5, rtol=1e-4), f"{name}: {key}"
    config = json.loads((ours / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == factors
    # the weight-sync stream yields exactly the merged export's tensors, and leaves the trained model as it was
    streamed, merged = load_file(ours / "streamed.safetensors"), load_file(ours / "merged" / "model.safetensors")
    assert streamed.keys() == merged.keys() and all(torch.equal(streamed[k], merged[k]) for k in merged)
    before = torch.load(ours / "logits.pt", weights_only=True)["logits"]
    assert torch.equal(torch.load(ours / "logits_after_stream.pt", weights_only=True)["logits"], before)
    return result


def _shards(run_dir: Path, factors: int, world: int) -> list[list[dict]]:
    return [json.loads((run_dir / f"m{factors}" / "shards" / f"rank{r}.json").read_text()) for r in range(world)]


def _expect_whole_effective(engine: str, row: dict, world: int) -> bool:
    """Whole effective blocks per rank: FSDP2 splits N in chunks of ceil(N/W) blocks, ZeRO-3 the flat tensor."""
    m, n_blocks, b, _ = row["global_shape"]
    per = 2 ** (m - 1)
    if engine == "fsdp2":  # block-major rows, ceil(N / W) per rank
        return -(-n_blocks // world) % per == 0
    return -(-(m * n_blocks * b * b) // world) % (per * b * b) == 0


def _reload_in_fresh_process(base: Path, run_dir: Path, factors=(2, 4)) -> None:
    dirs = [str(run_dir / f"m{m}") for m in factors]
    launch([sys.executable, RELOAD, "--base", str(base), *dirs], timeout=TIMEOUT, env=cpu_env()).check("reload check")


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "zero3_init", "fsdp2"])
def test_engine_matches_one_process(engine, base_dir, reference, tmp_path):
    _launch(engine, base_dir, tmp_path)
    for factors in (2, 4):
        result = _compare_with_reference(tmp_path, reference, factors)
        shards = _shards(tmp_path, factors, world=2)
        print(f"\n{engine} m={factors} per-rank boft_R shares:")
        for rank_rows in shards:
            for row in rank_rows[:2]:
                print(f"  rank {row['rank']} {row['name']}: {row['layout']} {row['local_elements']} elements")
        down = [next(r for r in rows if "layers.0.mlp.down_proj" in r["name"]) for rows in shards]
        total = factors * (96 // 4) * 16
        if engine in ("zero3", "zero3_init", "fsdp2"):
            assert result["plain_save"] == "refused"
            assert not any((tmp_path / f"m{factors}").glob("plain_save_rank*/adapter_model.safetensors"))
            assert [r["local_elements"] for r in down] == [total // 2, total // 2]
            for row in (r for rows in shards for r in rows):
                assert row["whole_blocks"], row  # W = 2 divides m * N here, so even ZeRO-3's flat split is aligned
                assert row["whole_effective_blocks"] == _expect_whole_effective(engine, row, world=2), row
        else:
            assert result["plain_save"] == "written"  # replicated tensors: PEFT's own save is fine
            assert [r["local_elements"] for r in down] == [total, total]
        if engine == "fsdp2":
            assert all(r["layout"] == "fsdp2" for rows in shards for r in rows)
    _reload_in_fresh_process(base_dir, tmp_path)


def test_fsdp2_from_meta_device(base_dir, tmp_path):
    """Meta-device construction + to_empty(): nothing the BOFT layer needs is lost (identity-initialised)."""
    _launch("single", base_dir, tmp_path / "single", extra=("--init", "identity", "--factors", "2"))
    _launch("fsdp2_meta", base_dir, tmp_path / "meta", extra=("--init", "identity", "--factors", "2"))
    _compare_with_reference(tmp_path / "meta", tmp_path / "single", 2)
    _reload_in_fresh_process(base_dir, tmp_path / "meta", factors=(2,))


def test_two_nodes_four_ranks_fsdp2_uneven_blocks(tmp_path):
    """Two launcher processes (--nnodes 2 --node_rank 0/1) x 2 ranks; 22 blocks per factor over 4 ranks."""
    base = _save_base(tmp_path / "base", hidden_size=88, intermediate_size=176, num_attention_heads=4)
    _launch("single", base, tmp_path / "single", extra=("--factors", "2"))
    port = __import__("boft_plugin.runtime.launchers", fromlist=["free_port"]).free_port()
    args = [WORKER, "--engine", "fsdp2", "--base", str(base), "--out", str(tmp_path / "nodes"), "--factors", "2"]
    nodes = [torchrun_cmd(args, nproc_per_node=2, nnodes=2, node_rank=r, master_port=port) for r in (0, 1)]
    launch(nodes, timeout=TIMEOUT).check("two-node run")
    _compare_with_reference(tmp_path / "nodes", tmp_path / "single", 2)
    q_proj = [
        next(r for r in rows if "layers.0.self_attn.q_proj" in r["name"]) for rows in _shards(tmp_path / "nodes", 2, 4)
    ]
    # 22 blocks of 4x4 per factor, 2 factors: ranks hold 6, 6, 6, 4 whole blocks of each factor
    assert [r["local_blocks"] for r in q_proj] == [12, 12, 12, 8]
    assert all(r["whole_blocks"] for r in q_proj)
    _reload_in_fresh_process(base, tmp_path / "nodes", factors=(2,))
