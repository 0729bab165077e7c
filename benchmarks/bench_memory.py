"""Memory per rank, measured from the processes: each engine at W = 1, 2, 4 on a real-size checkpoint.

    python benchmarks/bench_memory.py                       # ~0.9B fp32 Llama, ZeRO-3 and FSDP2, W = 1 2 4, SFT
    python benchmarks/bench_memory.py --size small --worlds 1 2     # a quick look (~56M parameters)
    python benchmarks/bench_memory.py --task dpo --worlds 2
    python benchmarks/bench_memory.py --task kto --worlds 2         # 2 rows per micro-batch (KTO's KL term)
    python benchmarks/bench_memory.py --task grpo --worlds 2        # generation (8 tokens) + training, 2 per prompt
    python benchmarks/bench_memory.py --task grpo --worlds 2 --engines zero3 --set ds3_gather_for_generation=true
    python benchmarks/bench_memory.py --size smollm2 --engines single ddp --worlds 1 2 --quant none 4bit 8bit
    python benchmarks/bench_memory.py --size smollm2 --engines zero3 fsdp2 --worlds 2 --quant 4bit

The checkpoint (random weights, saved once with 1 GB safetensors shards) is cached under
``$BOFT_PLUGIN_CACHE`` (default ``~/.cache/boft-plugin``). Each run is ``boft-plugin sft|dpo`` through the engine's own
launcher (ZeRO-3: ``accelerate launch --config_file integrations/accelerate/zero3.yaml``; FSDP2:
``torch.distributed.run`` + ``fsdp2_pre_shard``; single: one process; ddp: ``torch.distributed.run``) with BOFT b = 8,
m = 2 on every linear layer, 2 steps, the adapter and the merged export. ``--quant 4bit|8bit`` loads the base with
the recipe's bitsandbytes keys (ZeRO-3 and FSDP2 shard it after every rank loaded it whole and quantised, so their
``load`` peak holds the whole quantised base; FSDP2 takes 4-bit only); its model size is the loaded model's
``get_memory_footprint()``, measured in a child process. Every rank samples its own
``RssAnon`` (``/proc/self/status``, every 20 ms) per phase; the run's ``boft_run_summary.json`` holds them
(``rss_anon_mib_by_rank``). Printed: per engine and W, the largest rank's peak per phase, next to its share of the
model (model/W when sharded, the whole model when replicated) and to the bound share + 1.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {
    "big": {
        "shard": "1GB",
        "config": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
    },
    "small": {
        "shard": "100MB",
        "config": dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
    },
}
PHASES = ("load", "train", "export_adapter", "export_merged")
BOUND_GIB = 1.5


def cache_dir() -> Path:
    root = os.environ.get("BOFT_PLUGIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "boft-plugin")
    return Path(root)


BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from boft_plugin.runtime.atomic import atomic_directory
from boft_plugin.toy.models import char_tokenizer
import json
config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **json.loads(sys.argv[2]))
torch.manual_seed(1234)
model = LlamaForCausalLM(config)
with atomic_directory(sys.argv[1]) as staging:
    model.save_pretrained(str(staging), max_shard_size=sys.argv[3])
    char_tokenizer(model_max_length=2048).save_pretrained(str(staging))
"""


def checkpoint(size: str) -> tuple[Path, float]:
    """The cached checkpoint of ``size`` (built in a child process, so that its memory goes) and its GiB.

    ``smollm2``: the real SmolLM2-135M-Instruct of the main job (converted once from the registry package).
    """
    if size == "smollm2":
        from boft_plugin.demo.smollm2 import convert_smollm2

        path = convert_smollm2()
        return path, sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30
    spec = SIZES[size]
    path = cache_dir() / f"llama_{size}_fp32_bench"
    if not (path / "config.json").is_file():
        print(f"building {path} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", BUILD, str(path), json.dumps(spec["config"]), spec["shard"]], check=True)
    model_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return path, model_bytes / 2**30


QUANT_KEYS = {
    "none": {},
    "4bit": {"load_in_4bit": True, "use_bnb_nested_quant": True, "bnb_4bit_quant_storage": "bfloat16"},
    "8bit": {"load_in_8bit": True},
}
FOOTPRINT = """
import sys, json
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
keys = json.loads(sys.argv[2])
if keys.get("load_in_4bit"):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage="bfloat16")
else:
    config = BitsAndBytesConfig(load_in_8bit=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config, device_map="cpu")
print(model.get_memory_footprint())
"""


def quantised_gib(base: Path, quant: str) -> float:
    """The quantised base's size as loaded (``get_memory_footprint``), in a child process so its memory goes."""
    keys = json.dumps(QUANT_KEYS[quant])
    command = [sys.executable, "-c", FOOTPRINT, str(base), keys]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 2**30


def write_recipe(
    out: Path,
    base: Path,
    engine: str,
    task: str,
    steps: int,
    accumulation: int,
    quant: str = "none",
    extra: dict | None = None,
) -> Path:
    import yaml

    from boft_plugin.testing.recipes import write_tiny_data

    data = write_tiny_data(out.parent / "data", n_sft=64, n_dpo=64, n_kto=64)
    recipe = {
        "model_name_or_path": str(base),
        "output_dir": str(out),
        "dataset_name": str(data[task]),
        "boft_block_size": 8,
        "boft_n_butterfly_factor": 2,
        "boft_target_modules": ["all-linear"],
        "max_steps": steps,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": accumulation,
        "max_length": 64,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "activation_checkpointing": False,
        "export_merged": True,
        "overwrite_output_dir": True,
        "fsdp2_pre_shard": engine == "fsdp2",
        "data_order_tail": "pad",
        "disable_tqdm": True,
    }
    if task in ("dpo", "kto"):
        recipe["beta"] = 0.1
    if task in ("grpo", "rloo"):  # a generation batch = the global batch: prompts x num_generations completions
        del recipe["max_length"]
        recipe.update(
            beta=0.1,  # the KL term's reference pass (adapter disabled) too
            num_generations=2,
            max_completion_length=8,
            reward_funcs=["boft_plugin.toy.rewards.alphabet_reward"],
        )
    if task == "kto":  # KTO's KL term pairs rows within a micro-batch: at least 2 rows each
        recipe["per_device_train_batch_size"] = 2
        recipe["gradient_accumulation_steps"] = kto_accumulation(accumulation)
    recipe.update(QUANT_KEYS[quant])
    recipe.update(extra or {})
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def kto_accumulation(accumulation: int) -> int:
    """Accumulation steps of a KTO run (2 rows per micro-batch) for ``accumulation`` steps of one row."""
    return max(1, accumulation // 2)


def run(
    engine: str,
    world: int,
    base: Path,
    task: str,
    steps: int,
    work: Path,
    timeout: float,
    global_batch: int,
    quant: str = "none",
    extra: dict | None = None,
) -> dict:
    from boft_plugin.runtime.launchers import accelerate_cmd, cpu_env, launch, torchrun_cmd

    out = work / f"{task}_{engine}_{quant}_w{world}"
    # the same global batch at every W
    recipe = write_recipe(out, base, engine, task, steps, global_batch // world, quant, extra)
    cli = ["boft_plugin", task, "--config", str(recipe)]
    if engine == "zero3":
        cmd = accelerate_cmd(str(REPO / "integrations/accelerate/zero3.yaml"), ["-m", *cli], num_processes=world)
    elif engine == "single":
        if world != 1:
            raise ValueError("the single engine runs one process (use ddp for W > 1)")
        cmd = [sys.executable, "-m", *cli]
    else:
        cmd = torchrun_cmd(cli, nproc_per_node=world, module=True)
    started = time.monotonic()
    launch(cmd, timeout=timeout, env=cpu_env(), cwd=str(REPO)).check(f"{engine} W={world}")
    summary = json.loads((out / "boft_run_summary.json").read_text())
    return {
        "engine": engine,
        "quant": quant,
        "world": world,
        "wall_s": time.monotonic() - started,
        "ranks": summary["rss_anon_mib_by_rank"],
        "out": str(out),
    }


def relative_difference(ours: Path, reference: Path, pattern: str) -> float:
    """max |ours - reference| / max |reference| over every tensor of the matching safetensors files."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        merged = {}
        for file in sorted(folder.glob(pattern)):
            merged.update(load_file(file))
        return merged

    mine, theirs = tensors(ours), tensors(reference)
    if mine.keys() != theirs.keys():
        raise ValueError(f"{ours} and {reference} hold different tensors")
    diff = max((mine[k].double() - theirs[k].double()).abs().max().item() for k in theirs)
    scale = max(theirs[k].double().abs().max().item() for k in theirs)
    return diff / scale


def table(rows: list[dict], model_gib: float) -> str:
    """One row per run; a replicated engine's (single, ddp) share is the whole model, quantised as loaded."""
    lines = [
        f"| engine | base | W | model share GiB | bound GiB (share + {BOUND_GIB}) | "
        + " | ".join(f"{p} peak" for p in PHASES)
        + " | whole run, largest rank | met | load s (rank 0) | run wall s | adapter vs W=1 | merged vs W=1 |",
        "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|---|---|",
    ]
    for row in rows:
        whole_model = row.get("model_gib", model_gib)
        share = whole_model if row["engine"] in ("single", "ddp") else whole_model / row["world"]
        bound = share + BOUND_GIB
        peaks = {p: max(r.get(p, {}).get("peak_mib", 0.0) for r in row["ranks"]) / 1024 for p in PHASES}
        whole = max(v["peak_mib"] for r in row["ranks"] for v in r.values()) / 1024
        load_s = row["ranks"][0].get("load", {}).get("seconds", float("nan"))
        quant = row.get("quant", "none")
        cells = [row["engine"], "fp32" if quant == "none" else quant, str(row["world"]), f"{share:.2f}", f"{bound:.2f}"]
        cells += [f"{peaks[p]:.2f}" for p in PHASES]
        cells += [f"{whole:.2f}", "yes" if whole <= bound else "NO", f"{load_s:.1f}", f"{row['wall_s']:.0f}"]
        cells += [f"{row[k]:.1e}" if k in row else "-" for k in ("adapter_vs_w1", "merged_vs_w1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*sorted(SIZES), "smollm2"], default="big")
    parser.add_argument("--engines", nargs="+", default=["zero3", "fsdp2"], choices=["zero3", "fsdp2", "single", "ddp"])
    parser.add_argument("--quant", nargs="+", default=["none"], choices=sorted(QUANT_KEYS))
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--task", choices=["sft", "dpo", "kto", "grpo", "rloo"], default="sft")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench_memory"))
    parser.add_argument("--timeout", type=float, default=3000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe keys (YAML values)")
    args = parser.parse_args(argv)
    import yaml

    extra = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    base, model_gib = checkpoint(args.size)
    rows = []
    global_batch = max(args.worlds)
    sizes = {quant: model_gib if quant == "none" else quantised_gib(base, quant) for quant in args.quant}
    for quant in args.quant:
        if quant == "8bit" and "fsdp2" in args.engines:
            raise SystemExit("--quant 8bit: FSDP2 shards 4-bit bases only (docs/quantised.md)")
    for quant in args.quant:
        for engine in args.engines:
            for world in args.worlds:
                if engine == "single" and world != 1:
                    continue
                print(f"{engine} {quant} W={world} ...", file=sys.stderr, flush=True)
                work = args.workdir.absolute()
                row = run(engine, world, base, args.task, args.steps, work, args.timeout, global_batch, quant, extra)
                row["model_gib"] = sizes[quant]
                add_comparisons(row, rows)
                rows.append(row)
    batch_text = str(global_batch)
    if args.task == "kto":  # 2 rows per micro-batch
        kto_batches = sorted({2 * w * kto_accumulation(global_batch // w) for w in args.worlds})
        batch_text = " / ".join(map(str, kto_batches)) + " (KTO: 2 rows per micro-batch)"
    if args.task in ("grpo", "rloo"):
        batch_text += " completions (2 per prompt, up to 8 tokens; the train phase holds generation too)"
    print(
        f"{args.task.upper()}, {args.size} checkpoint ({model_gib:.2f} GiB fp32), global batch {batch_text}, "
        f"{args.steps} steps; peak RssAnon per rank in GiB; exports vs the same engine on 1 rank (max |diff| / max):"
    )
    print(table(rows, model_gib))
    if args.json:
        args.json.write_text(json.dumps({"model_gib": model_gib, "rows": rows}, indent=1))
    return 0


def add_comparisons(row: dict, rows: list[dict]) -> None:
    """Exports against the same engine and base on one rank (W > 1 only)."""
    if row["world"] == 1:
        return
    same = [r for r in rows if r["engine"] == row["engine"] and r["quant"] == row["quant"] and r["world"] == 1]
    if row["engine"] == "ddp" and not same:  # DDP's one-rank reference is the single engine
        same = [r for r in rows if r["engine"] == "single" and r["quant"] == row["quant"]]
    if same:
        ours, ref = Path(row["out"]), Path(same[0]["out"])
        row["adapter_vs_w1"] = relative_difference(ours, ref, "adapter_model.safetensors")
        row["merged_vs_w1"] = relative_difference(ours / "merged", ref / "merged", "*.safetensors")


if __name__ == "__main__":
    raise SystemExit(main())
