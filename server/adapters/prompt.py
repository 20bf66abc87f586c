"""Soft prompts: PEFT prompt tuning and p-tuning.

PEFT saves both as `prompt_embeddings` [n_virtual, hidden]: the final virtual-token
embeddings (for p-tuning, the prompt encoder's output at save time). At inference
they are prepended before the prompt's embeddings; positions run 0..n_virtual+L-1.
The virtual tokens' KV entries are the same for every request of one adapter (or one
combination of adapters: they pass through its LoRA and bottleneck too), so the engine computes
them once per adapter or combination and mode (`Adapter.prefixes`) and copies them into a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from server.adapters.weights import read_config, read_weights, require_finite
from server.errors import AdapterFormatError

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
KEY = "prompt_embeddings"


@dataclass(frozen=True)
class PromptSpec:
    peft_type: str
    num_virtual_tokens: int
    token_dim: int


@dataclass
class PrefixKV:
    """Per-layer keys and values of the virtual tokens: [Hkv, n_virtual, D] each."""

    keys: list[Tensor]
    values: list[Tensor]


@dataclass(eq=False)
class PromptAdapter:
    spec: PromptSpec
    embeddings: Tensor  # [n_virtual, hidden]

    @property
    def n_virtual(self) -> int:
        return self.spec.num_virtual_tokens

    @property
    def size_bytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()

    def to(self, device: torch.device, dtype: torch.dtype) -> "PromptAdapter":
        return PromptAdapter(self.spec, self.embeddings.to(device=device, dtype=dtype))

    def tensors(self) -> dict[str, Tensor]:
        return {KEY: self.embeddings.contiguous()}


def parse_prompt_config(cfg: dict) -> PromptSpec:
    peft_type = cfg.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterFormatError("peft_type", f"one of {', '.join(PEFT_TYPES)}", peft_type)
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError("num_transformer_submodules", "1 (decoder-only model)", cfg["num_transformer_submodules"])
    if cfg.get("modules_to_save"):
        raise AdapterFormatError("modules_to_save", "null (not supported)", cfg["modules_to_save"])
    n_virtual = cfg.get("num_virtual_tokens")
    if not isinstance(n_virtual, int) or n_virtual < 1:
        raise AdapterFormatError("num_virtual_tokens", "a positive integer", n_virtual)
    token_dim = cfg.get("token_dim")
    if not isinstance(token_dim, int):
        raise AdapterFormatError("token_dim", "an integer", token_dim)
    return PromptSpec(peft_type, n_virtual, token_dim)


def load_prompt(folder: Path, hidden: int) -> PromptAdapter:
    spec = parse_prompt_config(read_config(folder))
    if spec.token_dim != hidden:
        raise AdapterFormatError("token_dim", f"{hidden} (the base model's hidden size)", spec.token_dim)
    tensors = read_weights(folder, "adapter_model")
    if KEY not in tensors:
        raise AdapterFormatError(KEY, "a tensor named prompt_embeddings", sorted(tensors))
    extra = sorted(set(tensors) - {KEY})
    if extra:
        raise AdapterFormatError(extra[0], "only prompt_embeddings in a prompt-tuning file", extra[0])
    emb = tensors[KEY]
    expected = (spec.num_virtual_tokens, hidden)
    if tuple(emb.shape) != expected:
        raise AdapterFormatError(KEY, f"shape {list(expected)}", list(emb.shape))
    require_finite(KEY, emb)
    return PromptAdapter(spec, emb.float())
