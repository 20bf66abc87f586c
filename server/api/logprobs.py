"""OpenAI's logprobs objects: the legacy completions one and the chat one.

Both list only the generated tokens that made the answer's text: a stop string cut from the text
takes the tokens that lie wholly inside it out of the scores too. The legacy `top_logprobs` always
hold the chosen token (vLLM's convention, so `logprobs: 0` gives the chosen token's score).
"""
from __future__ import annotations

from itertools import accumulate

from server.api.generation import Outcome
from server.engine.logprobs import TokenLogprob


def kept_tokens(tokenizer, token_ids: list[int], text: str) -> int:
    """How many of the generated tokens contribute to `text` (all, unless a stop string cut it)."""
    if tokenizer.decode(token_ids, skip_special_tokens=True) == text:
        return len(token_ids)
    for k in range(len(token_ids) + 1):
        if len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)) >= len(text):
            return k
    return len(token_ids)


def legacy_logprobs(tokenizer, prompt_ids: list[int], out: Outcome, echo: bool) -> dict:
    """The echoed prompt's tokens (first one unscored) then the generated ones, as OpenAI lays them out."""
    ids: list[int] = []
    scores: list[TokenLogprob | None] = []
    if echo:
        ids += prompt_ids
        scores += [None, *(out.prompt_logprobs or [])]
    n = kept_tokens(tokenizer, out.token_ids, out.text)
    ids += out.token_ids[:n]
    scores += out.logprobs[:n]
    tokens = [tokenizer.decode([i]) for i in ids]
    return {
        "tokens": tokens,
        "token_logprobs": [None if s is None else s.logprob for s in scores],
        "top_logprobs": [None if s is None else _top(tokenizer, s, i) for i, s in zip(ids, scores)],
        "text_offset": list(accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else [],
    }


def _top(tokenizer, score: TokenLogprob, chosen: int) -> dict[str, float]:
    top = {tokenizer.decode([i]): lp for i, lp in score.top}
    top.setdefault(tokenizer.decode([chosen]), score.logprob)
    return top


def chat_logprobs(tokenizer, out: Outcome) -> dict:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...], "refusal": None}`."""
    n = kept_tokens(tokenizer, out.token_ids, out.text)
    content = []
    for token_id, score in zip(out.token_ids[:n], out.logprobs[:n]):
        entry = _chat_entry(tokenizer.decode([token_id]), score.logprob)
        entry["top_logprobs"] = [_chat_entry(tokenizer.decode([i]), lp) for i, lp in score.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def _chat_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
