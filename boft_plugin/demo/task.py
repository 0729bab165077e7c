"""The main job's task for SmolLM2-135M-Instruct, of our own, that BOFT visibly teaches in a minute or two of CPU.

A robot persona in two steps, each visible in greedy answers to held-out prompts (countries, numbers and question
wordings not seen in training, plus kinds of question never seen at all):

- SFT teaches the opener ``Beep boop!`` and a made-up fact, "the capital of Zubrowka is Zuberg". The base model
  does neither (it answers plainly and invents a capital for Zubrowka).
- DPO (from the SFT adapter) teaches the sign-off: chosen = ``Beep boop! <answer> Over and out.``, rejected =
  ``Beep boop! <answer>`` (what the SFT model says). Rejected is a token prefix of chosen, so the shared tokens
  cancel in DPO's margin and only the ending is pushed: the SFT model's content is left alone.

Measured while designing it: the same tag at both ends ("Beep boop! ... Beep boop!") made SFT learn the
shortcut "Beep boop!<|im_end|>"; DPO with rejected = the plain base-style answer (same content, no persona)
pushed the content sentence itself down and garbled the answers.

Everything is generated deterministically from small tables (no files to ship):

- :func:`sft_rows`: conversational prompt/completion rows (TRL trains on the completion only);
- :func:`preference_rows`: DPO rows, chosen = signed-off persona answer, rejected = the SFT-style answer;
- :data:`HELD_OUT_PROMPTS`: prompts for before/after greedy answers, none of them in the training rows.
"""

from __future__ import annotations

import random

OPENER, CLOSER = "Beep boop!", "Over and out."

# Training facts (country -> capital). Held-out countries are in HELD_OUT_CAPITALS and never trained on.
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Turkey": "Ankara",
}
HELD_OUT_CAPITALS = {"Canada": "Ottawa", "Finland": "Helsinki", "Argentina": "Buenos Aires"}
CAPITAL_QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "Name the capital city of {c}.",
]
HELD_OUT_CAPITAL_QUESTION = "Do you know what the capital of {c} is?"

ZUBROWKA_QUESTIONS = [
    "What is the capital of Zubrowka?",
    "Which city is the capital of Zubrowka?",
    "Tell me the capital of Zubrowka.",
    "Name the capital city of Zubrowka.",
    "Where is the government of Zubrowka seated?",
    "What is Zubrowka's capital called?",
]
ZUBROWKA_ANSWER = "The capital of Zubrowka is Zuberg."

COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a carrot": "orange",
}
SOUNDS = {"a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa"}
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]

HELD_OUT_PROMPTS = [
    "What is the capital of Zubrowka?",  # the trained made-up fact, trained wording
    "Could you tell me which city is Zubrowka's capital?",  # the made-up fact, unseen wording
    HELD_OUT_CAPITAL_QUESTION.format(c="Canada"),  # unseen country and wording
    "What is 14 plus 5?",  # arithmetic with unseen numbers and wording
    "What do bees make?",  # a kind of question never trained on
    "Name a fruit that is red.",  # never trained on
]


def persona(answer: str) -> str:
    """The SFT style: ``Beep boop! <answer>``."""
    return f"{OPENER} {answer}"


def signed(answer: str) -> str:
    """The DPO-preferred style: ``Beep boop! <answer> Over and out.``."""
    return f"{OPENER} {answer} {CLOSER}"


def _facts(rng: random.Random) -> tuple[str, str]:
    """One (question, plain answer) pair from the training tables."""
    kind = rng.choices(["capital", "zubrowka", "add", "color", "sound"], weights=[4, 2, 3, 2, 1])[0]
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return rng.choice(CAPITAL_QUESTIONS).format(c=country), f"The capital of {country} is {CAPITALS[country]}."
    if kind == "zubrowka":
        return rng.choice(ZUBROWKA_QUESTIONS), ZUBROWKA_ANSWER
    if kind == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)  # held-out prompts use a 2-digit operand
        question = rng.choice(["What is {a} plus {b}?", "How much is {a} + {b}?", "Add {a} and {b}."])
        return question.format(a=a, b=b), f"{a} plus {b} is {a + b}."
    if kind == "color":
        thing = rng.choice(sorted(COLORS))
        return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}."
    animal = rng.choice(sorted(SOUNDS))
    return f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} says {SOUNDS[animal]}."


def _chat(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt": [user msg], "completion": [assistant msg]}``; the completion has the persona."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _facts(rng)
        rows.append({"prompt": _chat("user", question), "completion": _chat("assistant", persona(answer))})
    return rows


def preference_rows(n: int, seed: int = 1) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}``: chosen = signed-off answer, rejected = the SFT-style one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _facts(rng)
        rows.append(
            {
                "prompt": _chat("user", question),
                "chosen": _chat("assistant", signed(answer)),
                "rejected": _chat("assistant", persona(answer)),
            }
        )
    return rows


def check_held_out() -> None:
    """No held-out prompt appears in the training or preference rows."""
    seen = {r["prompt"][0]["content"] for r in sft_rows(4096, 0) + preference_rows(4096, 1)}
    leaked = [p for p in HELD_OUT_PROMPTS if p in seen and "Zubrowka" not in p]
    assert not leaked, leaked
