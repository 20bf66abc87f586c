"""Log-probabilities for scoring: of chosen tokens and their top-N alternatives, in float32."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def token_logprobs(logits: Tensor, tokens: Tensor, n_top: list[int]) -> list[TokenLogprob]:
    """logits: [K, V], tokens: [K] long, n_top: K counts -> per row the token's logprob and its top n_top[i]."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [K, V]
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()  # [K]
    values, ids = lp.topk(max(n_top), dim=-1)  # [K, k]
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(c, tuple(zip(ids[i][:n], values[i][:n]))) for i, (c, n) in enumerate(zip(chosen, n_top))]
