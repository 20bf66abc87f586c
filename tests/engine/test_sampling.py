"""Sampling: a batch draws what each row draws alone, with one host sync; what top-k and top-p
keep is what they promise; the draws follow the filtered distribution."""
from __future__ import annotations

import pytest
import torch

from server.engine import sampling
from server.engine.sampling import Sampler, SamplingParams, draw, next_tokens

V = 50


def _sampler(seed: int, **kw) -> Sampler:
    return Sampler.for_params(SamplingParams(temperature=kw.pop("temperature", 0.9), seed=seed, **kw), torch.device("cpu"))


def _logits(n: int) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(5)) * 3  # [N, V]


def test_a_batch_draws_what_each_row_draws_alone():
    logits = _logits(6)
    kinds = [dict(), dict(top_k=5), dict(top_p=0.6), dict(temperature=0.0), dict(top_k=3, top_p=0.5), dict(top_k=0)]
    batch = [_sampler(i, **kw) for i, kw in enumerate(kinds)]
    alone = [_sampler(i, **kw) for i, kw in enumerate(kinds)]
    for _ in range(20):
        together = next_tokens(logits, batch).tokens
        one_by_one = [next_tokens(logits[i : i + 1], [s]).tokens[0] for i, s in enumerate(alone)]
        assert together == one_by_one
    assert together[3] == int(logits[3].argmax())  # temperature 0: greedy


def test_one_host_sync_per_step(monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or real(t))
    next_tokens(_logits(8), [_sampler(i, top_p=0.9) if i % 2 else _sampler(i, temperature=0.0) for i in range(8)])
    assert len(calls) == 1


@pytest.mark.parametrize(("top_k", "top_p"), [(4, 1.0), (0, 0.3), (10, 0.5)])
def test_only_the_kept_tokens_are_drawn_and_as_often_as_their_probability(top_k, top_p):
    row = _logits(1)  # [1, V]
    probs = torch.softmax(row[0] / 0.9, dim=-1)
    ranked, order = probs.sort(descending=True)
    keep = order[: top_k or V]  # top-k first, then top-p over what it kept, renormalised
    if top_p < 1.0:
        kept = ranked[: len(keep)] / ranked[: len(keep)].sum()
        keep = keep[: int((kept.cumsum(0) - kept < top_p).sum())]  # the smallest set reaching top_p
    want = torch.zeros(V)
    want[keep] = probs[keep] / probs[keep].sum()
    gen = torch.Generator().manual_seed(0)
    n = 20000
    tokens = draw(row.expand(n, V), [SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p)] * n, [gen] * n)
    seen = torch.bincount(tokens, minlength=V).float() / n
    assert set(tokens.unique().tolist()) <= set(keep.tolist())
    assert (seen - want).abs().max() < 0.015


def test_a_row_whose_draw_raises_fails_alone_and_the_others_draw_as_alone(monkeypatch):
    logits = _logits(3)
    alone = [next_tokens(logits[i : i + 1], [_sampler(i)]).tokens[0] for i in range(3)]
    real = sampling.draw

    def draw(lg, params, gens):
        if any(p.seed == 1 for p in params):
            raise RuntimeError("bad row")
        return real(lg, params, gens)

    monkeypatch.setattr(sampling, "draw", draw)
    picks = next_tokens(logits, [_sampler(i) for i in range(3)])
    assert list(picks.errors) == [1] and "bad row" in str(picks.errors[1])
    assert [picks.tokens[0], picks.tokens[2]] == [alone[0], alone[2]]


def test_non_finite_rows_are_reported_not_drawn_from():
    logits = _logits(3)
    logits[1, 7] = float("nan")
    picks = next_tokens(logits, [_sampler(i) for i in range(3)])
    assert picks.non_finite == [1] and not picks.errors


@pytest.mark.parametrize("params", [dict(temperature=1e-46), dict(temperature=0.7, top_p=1e-46)])
def test_a_temperature_or_top_p_that_is_zero_in_float32_is_greedy(params):
    logits = _logits(2)
    picks = next_tokens(logits, [_sampler(0, **params), _sampler(1, **params)])
    assert picks.tokens == logits.argmax(dim=-1).tolist() and not picks.errors
