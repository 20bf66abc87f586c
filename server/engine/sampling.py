"""Choosing the next token: greedy rows together, sampled rows each with its own generator."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token (0: the chosen one only); None: no scores
    prompt_logprobs: int | None = None  # the same for the prompt tokens after the first; None: no prompt scores

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sampler:
    """Per-request sampling state: the params and, when sampling, a seeded generator."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None, repr=False)

    @staticmethod
    def for_params(params: SamplingParams, device: torch.device) -> "Sampler":
        if params.greedy:
            return Sampler(params)
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.seed()))
        return Sampler(params, gen)


def next_tokens(logits: Tensor, samplers: list[Sampler]) -> list[int]:
    """logits: [N, V] float32 -> one token id per row."""
    out = logits.argmax(dim=-1).tolist()  # greedy for every row, overwritten below where sampling
    for i, s in enumerate(samplers):
        if s.generator is not None:
            out[i] = _sample_row(logits[i], s.params, s.generator)
    return out


def _sample_row(logits: Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """logits: [V] -> a token drawn after temperature, top-k and top-p filtering."""
    scaled = logits / p.temperature  # [V]
    if 0 < p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)  # [V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
