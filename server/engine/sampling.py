"""Choosing the next token: every row together, each sampled row with its own generator, one host sync."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


TINY = torch.finfo(torch.float32).smallest_normal * 2**-23  # the smallest positive float32 (1.4e-45)


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
    """logits: [N, V] float32 -> one token id per row; one host sync for the whole batch.

    The sampled rows are drawn together (`draw`), each from its own generator, so a row draws what
    it would alone. If that raises, each sampled row is drawn alone from its generator's state
    before, and only the rows that raise again fail."""
    greedy = logits.argmax(dim=-1)  # [N]
    # [N]: a NaN or ±inf anywhere makes the row's sum non-finite (7x cheaper than isfinite().all() here);
    # a finite row overflows the sum only with logits near 1e34, no distribution to sample either
    finite = torch.isfinite(logits.sum(dim=-1))
    rows = [i for i, s in enumerate(samplers) if s.generator is not None]
    errors: dict[int, Exception] = {}
    if rows:
        drawn, errors = _draw_rows(logits, finite, rows, samplers)  # [S]
        greedy = greedy.index_copy(0, torch.tensor(rows, device=logits.device), drawn)
    tokens, ok = torch.stack([greedy, finite.long()]).tolist()  # the one sync
    non_finite = [i for i, good in enumerate(ok) if not good]
    return Picks(tokens, non_finite, {i: e for i, e in errors.items() if ok[i]})


def _draw_rows(logits: Tensor, finite: Tensor, rows: list[int], samplers: list[Sampler]
               ) -> tuple[Tensor, dict[int, Exception]]:
    """The sampled rows' tokens [S] (0 where a row failed) and the failures by row."""
    idx = torch.tensor(rows, device=logits.device)
    chosen = torch.where(finite[idx, None], logits[idx], 0.0)  # [S, V]: a non-finite row draws from zeros
    params = [samplers[i].params for i in rows]
    gens = [samplers[i].generator for i in rows]
    states = [g.get_state() for g in gens]
    try:
        return draw(chosen, params, gens), {}
    except RuntimeError:  # a torch op refused some row's values: find which, alone
        pass
    out, errors = [], {}
    for j, (g, state) in enumerate(zip(gens, states)):
        g.set_state(state)
        try:
            out.append(draw(chosen[j : j + 1], params[j : j + 1], [g]))
        except RuntimeError as exc:  # this row's fault; the other rows go on
            errors[rows[j]] = exc
            out.append(torch.zeros(1, dtype=torch.long, device=logits.device))
    return torch.cat(out), errors


def draw(logits: Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> Tensor:
    """logits: [S, V] finite -> [S] tokens, row j drawn after temperature, top-k and top-p filtering
    with one uniform number from gens[j] (inverse CDF over the kept tokens, best first).

    The max is subtracted before dividing by the temperature, and the temperature is at least the
    smallest float32, so a tiny one (1e-40, 1e-46) tends to greedy instead of giving inf/inf or
    0/0 = NaN."""
    dev, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=dev)[:, None].clamp(min=TINY)  # [S, 1]
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temps  # [S, V], <= 0, the best at 0
    ranked, order = scaled.sort(dim=-1, descending=True, stable=True)  # [S, V]
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)[:, None]
    ranked = ranked.masked_fill(ranked < ranked.gather(1, ks - 1), float("-inf"))  # top-k: ties with the k-th stay
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]  # [S, 1]
    probs = torch.softmax(ranked, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0)  # keep the smallest set reaching top_p
    drop[:, 0] = False  # and the best token whatever top_p (a top_p of 1e-46 is 0 in float32)
    cdf = torch.softmax(ranked.masked_fill(drop, float("-inf")), dim=-1).cumsum(dim=-1)  # [S, V]
    u = 1.0 - torch.stack([torch.rand((), generator=g, device=dev) for g in gens])  # [S] in (0, 1]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=vocab - 1)  # [S, 1]: first cdf >= u
    return order.gather(1, pick)[:, 0]
