"""Decode attention straight from the paged KV cache on CUDA, in Triton (the CPU's: paged_attention.cpp).

One program per (row, kv head, share): the query heads of that kv head form one tile
`[GROUP, D]` (padded to 16 rows, as `tl.dot` needs), and the row's keys, from the first one it
sees (the sliding window's start, else 0) to its own length, come in tiles of BLOCK_N positions,
each read where it lies in the pool (block table[row, p // B], offset p % B: no gather, no
padding to the longest row), with an online softmax in float32. Few rows over long contexts fill
few programs, so each row's keys may be cut into `splits` contiguous shares (flash-decoding): each
program then writes its share's normalised output and log-sum-exp, and `_combine` weighs the
shares together. Called by engine/paged_attention.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 32  # key positions per tile (any block size B: positions are looked up one by one)
MIN_DOT = 16  # tl.dot's least M, N and K on NVIDIA GPUs
MIN_SHARE = 256  # keys: a share shorter than this costs more to combine than its parallelism gains
MAX_SPLITS = 32  # shares per row at most (the combine holds them all in one tile)


def paged_decode(q: Tensor, pool_k: Tensor, pool_v: Tensor, table: Tensor, lengths: Tensor, scale: float,
                 sliding_window: int | None, softcap: float | None, splits: int | None = None) -> Tensor:
    """q: [N, Hq, D]; pools: [blocks, Hkv, B, D]; table: [N, W] long; lengths: [N] long, each >= 1 (row n
    sees keys 0 .. lengths[n]-1, with a window only the last `sliding_window`) -> [N, Hq, D] in q's dtype.
    `splits`: shares of each row's keys (None: `split_count`'s)."""
    n, heads, dim = q.shape
    kv_heads, block = pool_k.shape[1:3]
    _check(q, pool_k, pool_v, table, lengths)
    q = q.contiguous()
    keys = table.shape[1] * block  # no row is longer: a bound known without a host sync
    splits = splits or split_count(n, kv_heads, keys, _processors(q.device))
    out = torch.empty_like(q)  # [N, Hq, D]
    if splits == 1:  # the program's output is the output: no log-sum-exp, no combine
        parts, lse, part_strides = out, out, (out.stride(0), out.stride(1), 0)
    else:
        parts = q.new_empty((n, heads, splits, dim), dtype=torch.float32)  # [N, Hq, S, D]
        lse = q.new_empty((n, heads, splits), dtype=torch.float32)  # [N, Hq, S]
        part_strides = parts.stride()[:3]
    group = heads // kv_heads
    dim_pad = max(MIN_DOT, triton.next_power_of_2(dim))
    _shares[(n, kv_heads, splits)](
        q, pool_k, pool_v, table, lengths, parts, lse,
        q.stride(0), q.stride(1), *pool_k.stride()[:3], table.stride(0), *part_strides, lse.stride(0), lse.stride(1),
        block, group, dim, splits, scale, sliding_window or keys, softcap or 1.0,
        GROUP_PAD=max(MIN_DOT, triton.next_power_of_2(group)), DIM_PAD=dim_pad, BLOCK_N=BLOCK_N,
        SOFTCAP=softcap is not None, STORE_LSE=splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 scores exact, not TF32
    )
    if splits > 1:
        _combine[(n, heads)](parts, lse, out, *parts.stride()[:3], lse.stride(0), lse.stride(1), out.stride(0),
                             out.stride(1), splits, dim, SPLITS_PAD=triton.next_power_of_2(splits), DIM_PAD=dim_pad)
    return out


def split_count(rows: int, kv_heads: int, keys: int, processors: int) -> int:
    """Shares per row: enough programs (rows x kv heads x shares) for about two per processor, no
    share under MIN_SHARE of the `keys` the longest row may have, at most MAX_SPLITS."""
    want = -(-2 * processors // (rows * kv_heads))
    return max(1, min(want, keys // MIN_SHARE, MAX_SPLITS))


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type != "cuda":  # interpreted on the CPU (the tests): one program at a time
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(q: Tensor, pool_k: Tensor, pool_v: Tensor, table: Tensor, lengths: Tensor) -> None:
    heads, dim = q.shape[1:]
    kv_heads, pool_dim = pool_k.shape[1], pool_k.shape[3]
    if heads % kv_heads or pool_dim != dim or pool_v.shape != pool_k.shape:
        raise ValueError(f"paged_decode: q heads {heads} must be a multiple of kv heads {kv_heads}, head dims "
                         f"{dim} and {pool_dim} equal, pools alike ({tuple(pool_k.shape)}, {tuple(pool_v.shape)})")
    if not (pool_k.dtype == pool_v.dtype == q.dtype) or table.dtype != torch.long or lengths.dtype != torch.long:
        raise TypeError(f"paged_decode: q, pools of one dtype (got {q.dtype}, {pool_k.dtype}, {pool_v.dtype}); "
                        f"table, lengths long (got {table.dtype}, {lengths.dtype})")
    if pool_k.stride(-1) != 1 or pool_v.stride() != pool_k.stride() or table.stride(-1) != 1:
        raise ValueError("paged_decode: pools and table must be contiguous in their last dimension, pools alike")


@triton.jit
def _shares(q, pool_k, pool_v, table, lengths, parts, lse,
            stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_tn, stride_pn, stride_ph, stride_ps,
            stride_ln, stride_lh,
            block, group, dim, splits, scale, window, softcap,
            GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
            SOFTCAP: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row, kv head, share): that share's attention for the kv head's query heads."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    share = tl.program_id(2)
    length = tl.load(lengths + row)
    first = tl.maximum(length - window, 0)  # key j is seen iff length - window <= j < length
    size = tl.cdiv(tl.cdiv(length - first, splits), BLOCK_N) * BLOCK_N  # a share: whole tiles
    lo = first + share * size
    hi = tl.minimum(lo + size, length)

    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    head_ok = heads < group
    dim_ok = dims < dim
    q_heads = kv_head * group + heads  # [G]
    tile_ok = head_ok[:, None] & dim_ok[None, :]  # [G, D]
    qt = tl.load(q + row * stride_qn + q_heads[:, None] * stride_qh + dims[None, :], mask=tile_ok, other=0.0)

    top = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # [G] running max of the scores
    total = tl.zeros([GROUP_PAD], tl.float32)  # [G] running sum of exp(score - top)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)  # [G, D]
    offsets = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):  # each tile holds at least one key: no row of -inf alone
        pos = start + offsets  # [BLOCK_N] int64
        key_ok = pos < hi
        blocks = tl.load(table + row * stride_tn + pos // block, mask=key_ok, other=0)  # [BLOCK_N] int64
        at = blocks * stride_kb + kv_head * stride_kh + (pos % block) * stride_kt  # [BLOCK_N] int64
        kv_ok = key_ok[:, None] & dim_ok[None, :]  # [BLOCK_N, D]
        kt = tl.load(pool_k + at[:, None] + dims[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, D]
        scores = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale  # [G, BLOCK_N] fp32
        if SOFTCAP:  # cap * tanh(s / cap), tanh(x) = 2 sigmoid(2x) - 1
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))  # [G]
        weights = tl.exp(scores - new_top[:, None])  # [G, BLOCK_N]
        rescale = tl.exp(top - new_top)  # [G]
        vt = tl.load(pool_v + at[:, None] + dims[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, D]
        acc = acc * rescale[:, None] + tl.dot(weights.to(vt.dtype), vt, input_precision=PRECISION)
        total = total * rescale + tl.sum(weights, 1)
        top = new_top

    seen = total > 0  # a share past a short row's keys holds none
    safe = tl.where(seen, total, 1.0)
    out = parts + row * stride_pn + q_heads[:, None] * stride_ph + share * stride_ps + dims[None, :]
    tl.store(out, (acc / safe[:, None]).to(parts.dtype.element_ty), mask=tile_ok)
    if STORE_LSE:
        at_lse = lse + row * stride_ln + q_heads * stride_lh + share
        tl.store(at_lse, tl.where(seen, top + tl.log(safe), float("-inf")), mask=head_ok)


@triton.jit
def _combine(parts, lse, out, stride_pn, stride_ph, stride_ps, stride_ln, stride_lh, stride_on, stride_oh,
             splits, dim, SPLITS_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    """Program (row, q head): the shares' outputs weighed by exp(their log-sum-exp) (share 0 always has keys)."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    shares = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    share_ok = shares < splits
    dim_ok = dims < dim
    sums = tl.load(lse + row * stride_ln + head * stride_lh + shares, mask=share_ok, other=float("-inf"))  # [S]
    weights = tl.exp(sums - tl.max(sums, 0))  # [S]
    at = parts + row * stride_pn + head * stride_ph + shares[:, None] * stride_ps + dims[None, :]
    each = tl.load(at, mask=share_ok[:, None] & dim_ok[None, :], other=0.0)  # [S, D]
    combined = tl.sum(weights[:, None] * each, 0) / tl.sum(weights, 0)  # [D]
    tl.store(out + row * stride_on + head * stride_oh + dims, combined.to(out.dtype.element_ty), mask=dim_ok)
