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


@dataclass(frozen=True)
class Picks:
    """The next token of each row, and the rows that got none (their request must end)."""

    tokens: list[int]  # per row; meaningless for the rows below
    non_finite: list[int]  # rows whose logits hold NaN or ±inf: nothing sensible to sample
    errors: dict[int, Exception]  # rows whose sampling raised, and what


def next_tokens(logits: Tensor, samplers: list[Sampler]) -> Picks:
    """logits: [N, V] float32 -> one token id per row; one host sync for the greedy rows."""
    greedy = logits.argmax(dim=-1)  # [N]
    # [N]: a NaN or ±inf anywhere makes the row's sum non-finite (7x cheaper than isfinite().all() here);
    # a finite row overflows the sum only with logits near 1e34, no distribution to sample either
    finite = torch.isfinite(logits.sum(dim=-1))
    tokens, ok = torch.stack([greedy, finite.long()]).tolist()  # greedy for every row, overwritten where sampling
    non_finite = [i for i, good in enumerate(ok) if not good]
    errors: dict[int, Exception] = {}
    for i, s in enumerate(samplers):
        if s.generator is None or not ok[i]:
            continue
        try:
            tokens[i] = _sample_row(logits[i], s.params, s.generator)
        except RuntimeError as exc:  # a torch op refused this row's values; the other rows go on
            errors[i] = exc
    return Picks(tokens, non_finite, errors)


def _sample_row(logits: Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """logits: [V] finite -> a token drawn after temperature, top-k and top-p filtering.

    The max is subtracted before dividing by the temperature, so a tiny temperature (1e-40)
    tends to greedy instead of overflowing to inf/inf = NaN."""
    scaled = (logits - logits.max()) / p.temperature  # [V], <= 0, the best token(s) at 0
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
