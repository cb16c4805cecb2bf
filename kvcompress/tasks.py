"""Prompt builders for quality checks (passkey retrieval)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources

_SYNTHETIC = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_HEAD = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
_QUESTION = "\n\nWhat is the pass key? The pass key is"


def default_text() -> str:
    """The text shipped with the package: ~160 KB of Shakespeare (public
    domain, the start of the "tiny shakespeare" corpus), used as passkey
    filler and for fidelity/perplexity when no text is given."""
    return resources.files("kvcompress").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")


def special_prefix(tokenizer) -> list[int]:
    """The token ids ``tokenizer`` puts before any text (e.g. ``[<bos>]`` for
    Gemma or Llama 3, nothing for SmolLM2's GPT-2 style tokenizer).

    Prompts here are built from pieces encoded without special tokens, so
    they start with this prefix instead: a model trained to see ``<bos>``
    first (Gemma answers nonsense without it) gets it, and one that never
    sees it gets nothing.
    """
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start])
    return []


@dataclass
class PasskeyPrompt:
    """A passkey-retrieval prompt: ``input_ids`` ``[1, T]`` and the hidden ``key``."""

    input_ids: object
    key: str
    n_filler: int
    depth: float

    def answered(self, generated_text: str) -> bool:
        """True when the first number in ``generated_text`` is exactly the key."""
        found = re.search(r"\d+", generated_text)
        return found is not None and found.group(0) == self.key


def passkey_prompt(tokenizer, n_filler: int, depth: float, *, key: int | None = None,
                   filler_text: str | None = None, seed: int = 0) -> PasskeyPrompt:
    """Hide a 5-digit pass key at ``depth`` (0 = start, 1 = end) of
    ``n_filler`` filler tokens and ask for it at the end.

    ``filler_text`` (e.g. a book) supplies the filler from a seeded random
    offset; without it a repeated synthetic sentence is used. The prompt is a
    plain continuation ending in "What is the pass key? The pass key is",
    which small instruct models answer more reliably than a chat turn and a
    base model without a chat template (Gemma 3 270M) can complete at all.
    It starts with the tokenizer's own special prefix (:func:`special_prefix`,
    e.g. ``<bos>``).
    """
    import torch

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: must be in [0, 1], got {depth}")
    if n_filler < 0:
        raise ValueError(f"n_filler: must be >= 0, got {n_filler}")
    rnd = random.Random(seed)
    key = rnd.randrange(10000, 100000) if key is None else key
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if filler_text:
        chars = min(len(filler_text), max(4 * n_filler * 8, 4096))
        start = rnd.randrange(0, max(1, len(filler_text) - chars))
        pool = encode(filler_text[start : start + chars])
    else:
        pool = encode(_SYNTHETIC)
    while len(pool) < n_filler:
        pool = pool + pool
    filler = pool[:n_filler]
    cut = int(round(len(filler) * depth))
    ids = (special_prefix(tokenizer) + encode(_HEAD) + filler[:cut] + encode(_NEEDLE.format(key=key))
           + filler[cut:] + encode(_QUESTION))
    return PasskeyPrompt(torch.tensor([ids]), str(key), n_filler, depth)
