"""OpenAI's legacy completions `logprobs` object: tokens, their logprobs, top alternatives, text offsets."""
from __future__ import annotations

from itertools import accumulate

from server.api.generation import Outcome
from server.engine.logprobs import TokenLogprob


def legacy_logprobs(tokenizer, prompt_ids: list[int], out: Outcome, echo: bool) -> dict:
    """The echoed prompt's tokens (first one unscored) then the generated ones, as OpenAI lays them out."""
    ids: list[int] = []
    scores: list[TokenLogprob | None] = []
    if echo:
        ids += prompt_ids
        scores += [None, *(out.prompt_logprobs or [])]
    ids += out.token_ids
    scores += out.logprobs
    tokens = [tokenizer.decode([i]) for i in ids]
    return {
        "tokens": tokens,
        "token_logprobs": [None if s is None else s.logprob for s in scores],
        "top_logprobs": [None if s is None else _top(tokenizer, s) for s in scores],
        "text_offset": list(accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else [],
    }


def _top(tokenizer, score: TokenLogprob) -> dict[str, float]:
    return {tokenizer.decode([i]): lp for i, lp in score.top}
