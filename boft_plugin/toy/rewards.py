"""Rule-based rewards for GRPO / RLOO on the toy tasks, named in recipes by their dotted path (as a user's own).

Each is called by TRL as ``f(prompts=..., completions=..., completion_ids=..., <the data's other columns>, **kw)``
and returns one float per completion.
"""

from __future__ import annotations

__all__ = ["alphabet_reward", "brevity_reward", "reversal_reward"]

ALPHABET = "abcdefgh"  # the toy tasks' letters (boft_plugin.toy.tasks)


def _text(completion) -> str:
    """A completion's text: a string, or a conversational completion (a list of messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def reversal_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Per completion: the share of positions where it matches ``answer`` (the dataset's column), over the longer of
    the two, so extra characters cost as much as wrong ones. 1.0 for the exact answer, 0.0 for an empty one."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = _text(completion).strip()
        longest = max(len(text), len(expected), 1)
        scores.append(sum(a == b for a, b in zip(text, expected, strict=False)) / longest)
    return scores


def alphabet_reward(completions: list, **kwargs) -> list[float]:
    """Per completion: the share of its non-space characters that are the toy tasks' letters (a-h); 0.0 when empty.
    Dense (sampled completions differ), so a real model's GRPO groups have a signal from the first step."""
    scores = []
    for completion in completions:
        text = "".join(_text(completion).split())
        scores.append(sum(ch in ALPHABET for ch in text) / len(text) if text else 0.0)
    return scores


def brevity_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """Per completion: minus its length in tokens / 32 (a reward any model can move: end sooner)."""
    return [-len(ids) / 32 for ids in completion_ids]
