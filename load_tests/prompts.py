"""Seeded random prompts, the same for the HTTP bench and the in-process PEFT baseline."""
from __future__ import annotations

import random

PROMPT_TOKENS = 32
FIRST_ORDINARY_ID = 2  # ids 0 and 1 are the tokenizer's special tokens
VOCAB_SIZE = 4096


def make_prompt(index: int, seed: int, length: int = PROMPT_TOKENS) -> list[int]:
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(FIRST_ORDINARY_ID, VOCAB_SIZE) for _ in range(length)]


def make_prompts(count: int, seed: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    return [make_prompt(i, seed, length) for i in range(count)]
