"""Activated LoRA (aLoRA, PEFT >= 0.18 `alora_invocation_tokens`): the LoRA applies only from the
last full occurrence of its invocation sequence in the prompt on (the invocation tokens included)
and to every generated token; before it the row is the base model's, so its KV entries there are
the base model's too. With no full occurrence in the prompt the row is the base model throughout.

PEFT's `calculate_alora_offsets` searches the `input_ids` handed to `generate` (for chat, the
templated prompt) once, before the first forward; generated tokens never move the start. Here:

    start = activation_start(prompt_ids, invocation)   # index in the prompt, or None (never active)
    req.lora_start = row_start(prompt_ids, invocation, n_virtual)   # in row positions
    gate = positions >= starts                           # [N, L] per forward, starts [N, 1] (engine/batch.py)

A row position counts a soft prompt's virtual tokens first, so they are before any invocation.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from server.errors import AdapterFormatError

NEVER = 2**62  # the start of a row whose prompt holds no full invocation: no position reaches it


def activation_start(ids: Sequence[int], invocation: Sequence[int]) -> int | None:
    """The index in `ids` where the last full occurrence of `invocation` begins, or None."""
    n, first, want = len(invocation), invocation[0], list(invocation)
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == first and list(ids[i : i + n]) == want:
            return i
    return None


def row_start(prompt_ids: Sequence[int], invocation: Sequence[int], offset: int) -> int:
    """The first row position where a row's LoRA applies: 0 for a plain LoRA; for an aLoRA its
    invocation's start, after `offset` virtual tokens, or NEVER when the prompt holds none."""
    if not invocation:
        return 0
    start = activation_start(prompt_ids, invocation)
    return NEVER if start is None else offset + start


def check_activation(invocation: tuple[int, ...], targets: list[str], model: nn.Module) -> None:
    """An aLoRA's invocation ids are token ids of the base model, and its LoRA leaves the output layer
    alone (its logits are read after the forward, where positions no longer gate it)."""
    vocab = model.config.vocab_size
    bad = [t for t in invocation if not 0 <= t < vocab]
    if bad:
        raise AdapterFormatError("alora_invocation_tokens", f"token ids in [0, {vocab})", bad[:5])
    output = model.get_output_embeddings()
    head = next((name for name in targets if model.get_submodule(name) is output), None)
    if head is not None:
        raise AdapterFormatError("target_modules", "an aLoRA that leaves the output layer alone", head)
