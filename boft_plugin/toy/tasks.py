"""Synthetic tasks a tiny model learns in seconds, and a tiny "pretrained" base model, all made locally.

- base model (:func:`make_toy_base`): a tiny Llama briefly trained in full on *copying* strings in the chat format
  of :func:`boft_plugin.toy.models.char_tokenizer` (a stand-in for a pretrained checkpoint);
- SFT (:func:`sft_examples`): *reverse* the string; the base model copies, so BOFT has something to learn;
- DPO (:func:`preference_examples`): the reversed string (chosen) over the copied one (rejected), the base
  model's habit;
- KTO (:func:`unpaired_preference_examples`): the same pairs unpaired, the reversed string desirable and the copy
  undesirable (TRL's ``prompt`` / ``completion`` / ``label`` rows);
- GRPO / RLOO (:func:`prompt_examples`): prompts to reverse a string with the ``answer`` beside them, scored by
  :mod:`boft_plugin.toy.rewards`.

Rows come as ``messages`` (conversational), ``prompt``/``completion`` or ``text`` for SFT, and conversational or
plain ``prompt``/``chosen``/``rejected`` for DPO.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

ALPHABET = "abcdefgh"


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def _prompt(verb: str, word: str) -> str:
    return f"{verb} {word}"


def sft_examples(n: int, seed: int = 0, fmt: str = "messages") -> list[dict]:
    """``n`` "reverse the string" examples as ``messages``, ``prompt_completion`` or ``text`` rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = _word(rng)
        prompt, answer = _prompt("reverse", word), word[::-1]
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif fmt == "prompt_completion":
            rows.append({"prompt": f"{prompt}=", "completion": answer})
        elif fmt == "text":
            rows.append({"text": f"{prompt}={answer}"})
        else:
            raise ValueError(f"unknown format {fmt!r} (messages, prompt_completion, text)")
    return rows


def preference_examples(n: int, seed: int = 1, conversational: bool = True) -> list[dict]:
    """``n`` preference pairs: the reversed string (chosen) over the copy (rejected); palindromes are skipped."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        word = _word(rng)
        if word == word[::-1]:
            continue
        prompt, chosen, rejected = _prompt("reverse", word), word[::-1], word
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": f"{prompt}=", "chosen": chosen, "rejected": rejected})
    return rows


def unpair_mixed(pairs: list[dict]) -> list[dict]:
    """KTO rows (``prompt`` / ``completion`` / ``label``) from preference pairs, desirable and undesirable rows
    alternating and no two neighbours sharing a prompt.

    KTO reads its rows in order and estimates its KL term from each row's neighbour (a mismatched prompt and
    completion), so the order matters: pair i gives its chosen row in the first half when i is even and its rejected
    row otherwise, and the other row in the second half. (TRL's own ``unpair_preference_dataset`` puts every chosen
    row of a block of 1000 pairs before every rejected one.)
    """
    first, second = [], []
    for index, pair in enumerate(pairs):
        chosen = {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}
        rejected = {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}
        first.append(chosen if index % 2 == 0 else rejected)
        second.append(rejected if index % 2 == 0 else chosen)
    return first + second


def unpaired_preference_examples(n: int, seed: int = 3, conversational: bool = False) -> list[dict]:
    """``n`` KTO rows from ``n // 2`` (rounded up) preference pairs, ordered by :func:`unpair_mixed`."""
    return unpair_mixed(preference_examples((n + 1) // 2, seed=seed, conversational=conversational))[:n]


def prompt_examples(n: int, seed: int = 4, conversational: bool = False) -> list[dict]:
    """``n`` GRPO / RLOO rows: a ``prompt`` to reverse a string and its ``answer`` (read by
    :func:`boft_plugin.toy.rewards.reversal_reward`)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = _word(rng)
        prompt = _prompt("reverse", word)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}], "answer": word[::-1]})
        else:
            rows.append({"prompt": f"{prompt}=", "answer": word[::-1]})
    return rows


def pretraining_texts(n: int, seed: int = 2) -> list[str]:
    """Chat-formatted *copy* dialogues (what the toy base model learns before any adapter)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        word = _word(rng)
        texts.append(f"<|user|>{_prompt('copy', word)}</s><|assistant|>{word}</s>")
    return texts


def make_toy_base(
    output_dir: str | os.PathLike, seed: int = 0, steps: int = 300, batch_size: int = 32, lr: float = 3e-3, **config
) -> Path:
    """Write a tiny Llama + character tokenizer to ``output_dir`` (``from_pretrained``-ready).

    With ``steps > 0`` the model is first trained in full on :func:`pretraining_texts` (a few seconds on a CPU),
    so that it "knows" the chat format and copies strings. ``config`` overrides ``tiny_llama_config`` fields.
    """
    import torch

    from .models import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    model = tiny_llama(seed, **config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and does not fight other processes
    try:
        _pretrain(model, tokenizer, seed, steps, batch_size, lr)
    finally:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return output_dir


def _pretrain(model, tokenizer, seed: int, steps: int, batch_size: int, lr: float) -> None:
    import torch

    if steps > 0:
        generator = torch.Generator().manual_seed(seed)
        texts = pretraining_texts(max(batch_size * 8, 256), seed=seed + 2)
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            index = torch.randint(0, len(texts), (batch_size,), generator=generator)
            loss = model(
                input_ids=encoded.input_ids[index], attention_mask=encoded.attention_mask[index], labels=labels[index]
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
