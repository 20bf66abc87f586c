"""Decode attention straight from the paged KV cache: on the CPU server/kernels/paged_attention.cpp,
on CUDA server/kernels/attention_triton.py.

One query per row, each row over its own length, keys and values read where they lie in the block
pool: no gather into a `[rows, longest]` rectangle and no mask. The Triton kernel is checked once
per geometry on CUDA against the gathered keys (`_triton_checked`: a real compile may reject or
miscompute what the interpreter the tests run passes). Where the CPU kernels cannot be built
(server/kernels), where triton is not installed, or where that check fails (one warning), the
decoder gathers the rows' blocks and runs SDPA.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from server import kernels

log = logging.getLogger(__name__)

CHECK_LENGTHS = (1, 3, 2, 5)  # the check's rows, in blocks: very different lengths, none a whole block
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


class KernelMismatch(RuntimeError):
    """The Triton kernel, compiled here, does not give the attention the gathered keys give."""


def decode(query: Tensor, pool_k: Tensor, pool_v: Tensor, table: Tensor, lengths: Tensor, scaling: float | None,
           sliding_window: int | None, softcap: float | None) -> Tensor:
    """query: [N, Hq, 1, D]; pools: [blocks, Hkv, B, D]; table: [N, W]; lengths: [N] keys each row sees
    -> [N, 1, Hq, D]."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if kernels.on_triton(query):
        from server.kernels import attention_triton  # imports triton: only where a Triton tensor comes
        out = attention_triton.paged_decode(query[:, :, 0], pool_k, pool_v, table, lengths, scale, sliding_window,
                                            softcap)  # [N, Hq, D]
    else:
        out = kernels.cpu().paged_decode(query[:, :, 0], pool_k, pool_v, table, lengths, scale,
                                         sliding_window or 0, softcap or 0.0)  # [N, Hq, D]
    return out[:, None]


def usable(query: Tensor, pool: Tensor) -> bool:
    """One query per row (query: [N, Hq, L, D]) and a kernel for its device: Triton, checked for this
    geometry (pool: [..., Hkv, B, D]), or on the CPU the C++ kernel, built."""
    if query.shape[2] != 1:
        return False
    if kernels.on_triton(query):
        return _triton_checked(query.device, query.dtype, query.shape[1], *pool.shape[-3:])
    return query.is_cpu and kernels.cpu() is not None


@functools.cache
def _triton_checked(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, block: int,
                    dim: int) -> bool:
    """Whether the Triton kernel gives what the gathered keys give, for this geometry, on a small
    problem: rows of 1 to 5 blocks in a shuffled pool, plain, then windowed and softcapped in shares."""
    from server.kernels import attention_triton
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([n * block - 1 or 1 for n in CHECK_LENGTHS])  # [N]
    width = max(CHECK_LENGTHS)
    ids = torch.randperm(len(CHECK_LENGTHS) * width, generator=gen) + 1  # [N * W], shuffled
    held = torch.arange(width)[None, :] < torch.tensor(CHECK_LENGTHS)[:, None]  # [N, W]
    table = ids.view(len(CHECK_LENGTHS), width).masked_fill(~held, 0)  # [N, W], padded with the null block
    pool_k, pool_v = (torch.randn(table.numel() + 1, kv_heads, block, dim, generator=gen) for _ in range(2))
    query = torch.randn(len(lengths), heads, dim, generator=gen)  # [N, Hq, D]
    try:
        for window, softcap, splits in ((None, None, 1), (block + 3, 5.0, 3)):
            args = [t.to(device) for t in (query.to(dtype), pool_k.to(dtype), pool_v.to(dtype), table, lengths)]
            got = attention_triton.paged_decode(*args, dim ** -0.5, window, softcap, splits=splits)
            want = _gathered(*(t.to(dtype).float() for t in (query, pool_k, pool_v)), table, lengths, dim ** -0.5,
                             window, softcap)
            error = (got.float().cpu() - want).abs().max().item()
            if not error <= CHECK_TOLERANCE[dtype]:
                raise KernelMismatch(f"max |difference| {error:.3g} (window {window}, softcap {softcap})")
    except Exception as exc:  # noqa: BLE001 - a compile error or a mismatch: the gather path serves
        log.warning("Triton paged decode attention unusable on %s for %s, %d/%d heads, block %d, head dim %d "
                    "(%s); decode gathers blocks for SDPA", device, dtype, heads, kv_heads, block, dim, exc)
        return False
    return True


def _gathered(query: Tensor, pool_k: Tensor, pool_v: Tensor, table: Tensor, lengths: Tensor, scale: float,
             sliding_window: int | None, softcap: float | None) -> Tensor:
    """What the kernels compute, the gather way, in float32: query [N, Hq, D] -> [N, Hq, D]."""
    n, width = table.shape
    kv_heads, block, dim = pool_k.shape[1:]
    keys, values = (pool.index_select(0, table.view(-1)).view(n, width, kv_heads, block, dim)
                    .transpose(1, 2).reshape(n, kv_heads, width * block, dim).float() for pool in (pool_k, pool_v))
    group = query.shape[1] // kv_heads
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [N, Hq, T, D]
    scores = torch.einsum("nhd,nhtd->nht", query.float(), keys) * scale  # [N, Hq, T]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    at = torch.arange(width * block)  # [T]
    seen = at[None, :] < lengths[:, None]  # [N, T]
    if sliding_window is not None:
        seen &= at[None, :] >= lengths[:, None] - sliding_window
    weights = scores.masked_fill(~seen[:, None], float("-inf")).softmax(-1)  # [N, Hq, T]
    return torch.einsum("nht,nhtd->nhd", weights, values)
