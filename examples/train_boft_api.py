"""BOFT through the Python API: register, get_peft_model, a few training steps, export, reload check.

    python examples/train_boft_api.py [--output_dir runs/examples/api]

Uses the recipe builder for the model, tokenizer and BOFTConfig (the same builder as ``boft-plugin sft``), then
plain PEFT + PyTorch: no trainer. Runs on a CPU in a few seconds; the last step reloads the exported adapter
with *stock* PEFT (and the merged model with plain transformers) in a fresh process and compares logits.
"""

from __future__ import annotations

import argparse
import sys

import torch
from peft import get_peft_model

import boft_plugin
from boft_plugin.export.verify import check_report, verify_in_fresh_process
from boft_plugin.recipes import build, parse_recipe
from boft_plugin.recipes.outputs import write_probe
from boft_plugin.toy.tasks import sft_examples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/examples/api")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    # 1. model + tokenizer + BOFTConfig from a recipe mapping (the same keys as a recipe YAML).
    recipe = parse_recipe(
        "sft",
        config={
            "tiny_model": True,
            "output_dir": args.output_dir,
            "boft_block_size": 4,
            "boft_n_butterfly_factor": 2,
            "boft_target_modules": ["all-linear"],
            "report_to": "none",
        },
    )
    built = build(recipe)  # writes the seeded tiny base model to <output_dir>/base_model
    tokenizer = built.tokenizer

    # 2. register boft_plugin with PEFT and adapt the model: PEFT's own API, our layers.
    boft_plugin.register()
    model = get_peft_model(built.model, built.peft_config)
    model.print_trainable_parameters()

    # 3. a few steps of plain PyTorch on "reverse the string" (loss on the completion only).
    rows = sft_examples(256, seed=0, fmt="prompt_completion")
    texts = [row["prompt"] + row["completion"] + tokenizer.eos_token for row in rows]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for i, row in enumerate(rows):  # mask the prompt
        labels[i, : len(tokenizer(row["prompt"]).input_ids)] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        index = torch.randint(0, len(rows), (16,), generator=generator)
        inputs = {"input_ids": batch.input_ids[index], "attention_mask": batch.attention_mask[index]}
        loss = model(**inputs, labels=labels[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    # 4. export: a PEFT adapter (gathered, atomic; collective under DDP/ZeRO/FSDP2) and a merged model.
    #    export_adapter replaces its target directory as a whole, so give it its own directory.
    adapter_dir = f"{args.output_dir}/adapter"
    boft_plugin.export_adapter(model, adapter_dir)
    boft_plugin.export_merged(model, f"{adapter_dir}/merged")
    write_probe(model, tokenizer, "reverse abcdef=", f"{adapter_dir}/probe_logits.pt")
    print(f"adapter -> {adapter_dir}, merged model -> {adapter_dir}/merged")

    # 5. reload with stock PEFT (m=2 really runs) and plain transformers in a fresh process; compare logits.
    (report,) = verify_in_fresh_process(adapter_dir)
    print(
        f"stock PEFT reload: max relative logit error {report['oracle_rel_err']:.2e} "
        f"(m={report['n_butterfly_factor']}), merged {report['merged_rel_err']:.2e}"
    )
    return 1 if check_report(report) else 0


if __name__ == "__main__":
    sys.exit(main())
