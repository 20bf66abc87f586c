"""Unmerged LoRA deltas of a batch on CUDA, each token by its slot (BGMV at decode, SGMV at prefill):
the Triton counterpart of lora_delta.cpp, with the same slot table and the same arithmetic.

x: [T, in] and out: [T, out] (T = rows · tokens), out = base_layer(x) on entry; slot_of_token: [T]
int32, -1 where the token gets no delta (a base row, an aLoRA token before its invocation); table:
[S, 6] int64 per slot, on x's device: A's address ([r, in], row-major), B's ([out, r], stored
column-major, i.e. as Bᵀ [r, out] row-major, so a tile of outputs reads contiguous memory), r (0:
the slot's adapter has no LoRA at this module, its tokens get no delta), the
address of `shift` ([out], 0: none) and of DoRA's g ([out], 0: none), and a dtype column that is 0
here (the CPU kernel's bfloat16 copies are not read on CUDA): every tensor of x's dtype and
kept alive by the caller; scales: [S] float32, s = alpha / r; bias: [out] or None (DoRA's x Wᵀ is
out − bias). The kernels load each slot's addresses from the table and cast them to pointers (as
Triton's grouped-GEMM tutorial does), so a join or a leave builds a table of a few integers and
copies no weights.

Per token t of slot k: h = s · A x  ([r], float32), d = B h  ([out], float32), then
  plain:  out += d + shift            DoRA: out += (g − 1) · (out − bias) + g · d + shift

Two launches: `_shrink` writes h for every token into an [T, R] float32 buffer (R: the largest
rank; a slot's program stops at its own rank), `_expand` reads it and updates out. A program takes a
tile of BLOCK_M consecutive tokens (1 at decode: every row its own program; 16 at prefill, where a
row's tokens share a slot) and loops over the distinct slots in its tile, loading each one's weights
once. Products are explicit multiplies and `tl.sum` reductions in float32, not `tl.dot` (which
wants every dim >= 16 and rounds float32 to tf32 by default): a rank-4 slot computes 4 lanes' worth
padded to BLOCK_R, never the batch's largest rank, and within a tiling a token's sums are the same
whatever else is in its tile or batch (decode and prefill block K differently: a float32 rounding
apart). Sizes and strides are not specialised on (`do_not_specialize`), so the
kernels a first-use check compiles are the ones every later shape runs.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

COLUMNS = tl.constexpr(6)  # of the table: A, B, r, shift, g, dtype (0 on CUDA: A's and B's are x's)
NO_SLOT = tl.constexpr(2**31 - 1)  # above any slot: where a tile's finished tokens stand when the next is picked
DECODE = (1, 16, 128, 128)  # BLOCK_M, BLOCK_R, BLOCK_K (shrink), BLOCK_N (expand): one token per program
PREFILL = (16, 16, 32, 32)  # ... a tile of 16 tokens: the [M, R, K] and [M, N, R] products stay at 8k lanes


def lora_delta(x: Tensor, out: Tensor, slot_of_token: Tensor, table: Tensor, scales: Tensor,
               bias: Tensor | None, max_rank: int, tokens_per_row: int) -> None:
    """Add each token's delta into `out` in place. x: [T, in], out: [T, out] (any strides); the
    vectors contiguous; `tokens_per_row` picks the tiling (1: decode)."""
    for name, t in (("slot_of_token", slot_of_token), ("table", table), ("scales", scales), ("bias", bias)):
        if t is not None and not t.is_contiguous():  # the kernels index them densely
            raise ValueError(f"lora_delta: {name} must be contiguous, got strides {t.stride()}")
    n_tokens, n_in = x.shape
    n_out = out.shape[1]
    block_m, block_r, block_k, block_n = DECODE if tokens_per_row == 1 else PREFILL
    h = x.new_empty((n_tokens, max_rank), dtype=scales.dtype)  # [T, R] float32: s · A x per token
    tiles = triton.cdiv(n_tokens, block_m)
    _shrink[(tiles, triton.cdiv(max_rank, block_r))](
        x, h, slot_of_token, table, scales, n_tokens, n_in, max_rank, *x.stride(),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k)
    _expand[(tiles, triton.cdiv(n_out, block_n))](
        h, out, slot_of_token, table, out if bias is None else bias, n_tokens, n_out, max_rank, *out.stride(),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n)


@triton.jit
def _tile(slot_ptr, T, BLOCK_M: tl.constexpr):
    """This program's token rows (int64, for the address arithmetic) and their slots, -1 past T."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    return rows, tl.load(slot_ptr + rows, mask=rows < T, other=-1)


@triton.jit
def _next_slot(slots, todo):
    """The smallest slot among the tile's tokens still to do, and which tokens have it."""
    slot = tl.min(tl.where(todo, slots, NO_SLOT), axis=0)
    return slot, todo & (slots == slot)


@triton.jit(do_not_specialize=("T", "K", "R", "stride_xm", "stride_xk"))
def _shrink(x_ptr, h_ptr, slot_ptr, table_ptr, scale_ptr, T, K, R, stride_xm, stride_xk,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[t, r0:r0+BLOCK_R] = s · A[r0:r0+BLOCK_R] x[t] for the tile's tokens; r0 = program_id(1) · BLOCK_R."""
    rows, slots = _tile(slot_ptr, T, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    todo = slots >= 0
    while tl.sum(todo.to(tl.int32), axis=0) > 0:
        slot, mine = _next_slot(slots, todo)
        entry = table_ptr + slot.to(tl.int64) * COLUMNS
        rank = tl.load(entry + 2)
        if tl.program_id(1) * BLOCK_R < rank:
            a_ptr = tl.load(entry).to(tl.pointer_type(x_ptr.dtype.element_ty))  # [r, in]
            r_ok = ranks < rank
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
                k_ok = ks < K
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=mine[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
                at = tl.load(a_ptr + ranks[:, None].to(tl.int64) * K + ks[None, :],
                             mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
                acc += tl.sum(xt[:, None, :] * at[None, :, :], axis=2)
            tl.store(h_ptr + rows[:, None] * R + ranks[None, :], acc * tl.load(scale_ptr + slot),
                     mask=mine[:, None] & r_ok[None, :])
        todo = todo & ~mine


@triton.jit(do_not_specialize=("T", "N", "R", "stride_om", "stride_on"))
def _expand(h_ptr, out_ptr, slot_ptr, table_ptr, bias_ptr, T, N, R, stride_om, stride_on,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, n0:n0+BLOCK_N] += B h[t] (+ DoRA, shift) for the tile's tokens; n0 = program_id(1) · BLOCK_N."""
    rows, slots = _tile(slot_ptr, T, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = cols < N
    todo = slots >= 0
    while tl.sum(todo.to(tl.int32), axis=0) > 0:
        slot, mine = _next_slot(slots, todo)
        entry = table_ptr + slot.to(tl.int64) * COLUMNS
        rank = tl.load(entry + 2)
        if rank > 0:  # 0: the slot's adapter has no LoRA at this module
            _expand_slot(h_ptr, out_ptr, entry, bias_ptr, rows, mine, cols, n_ok, rank, N, R, stride_om, stride_on,
                         HAS_BIAS, BLOCK_M, BLOCK_R, BLOCK_N)
        todo = todo & ~mine


@triton.jit
def _expand_slot(h_ptr, out_ptr, entry, bias_ptr, rows, mine, cols, n_ok, rank, N, R, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[mine, cols] += B h (+ DoRA, shift) for one slot's tokens of the tile."""
    bt_ptr = tl.load(entry + 1).to(tl.pointer_type(out_ptr.dtype.element_ty))  # Bᵀ: [r, out]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        r_ok = ranks < rank
        ht = tl.load(h_ptr + rows[:, None] * R + ranks[None, :],
                     mask=mine[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] float32
        bt = tl.load(bt_ptr + ranks[None, :].to(tl.int64) * N + cols[:, None],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        acc += tl.sum(ht[:, None, :] * bt[None, :, :], axis=2)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on  # [BLOCK_M, BLOCK_N]
    here = mine[:, None] & n_ok[None, :]
    base = tl.load(out_ptrs, mask=here, other=0.0).to(tl.float32)
    acc = _dora(acc, base, entry, bias_ptr, cols, n_ok, out_ptr.dtype.element_ty, HAS_BIAS)
    shift_addr = tl.load(entry + 3)
    if shift_addr != 0:
        shift = tl.load(shift_addr.to(tl.pointer_type(out_ptr.dtype.element_ty)) + cols, mask=n_ok, other=0.0)
        acc += shift.to(tl.float32)[None, :]
    tl.store(out_ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=here)


@triton.jit
def _dora(acc, base, entry, bias_ptr, cols, n_ok, DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(g − 1) · (out − bias) + g · d where the slot has DoRA's g, else d. acc, base: [BLOCK_M, BLOCK_N] float32."""
    g_addr = tl.load(entry + 4)
    if g_addr != 0:
        g = tl.load(g_addr.to(tl.pointer_type(DTYPE)) + cols, mask=n_ok, other=1.0)
        g = g.to(tl.float32)[None, :]
        xw = base
        if HAS_BIAS:
            xw = base - tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = (g - 1.0) * xw + g * acc
    return acc
