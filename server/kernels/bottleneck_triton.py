"""Bottleneck projections of a batch on CUDA, each token by its slot (BGMV at decode, SGMV at
prefill): the down and up projections of adapters/bottleneck_layer.py's `FormSite`, whose norms,
activation, scaling and residuals run as torch ops over each form's rows.

x: [T, X] and out: [T, Y], contiguous (T = rows · tokens); slot_of_token: [T] int32, -1 where the
token has no slot (its row of `out` is left as it is); table: [S, 6] int64 per slot, on x's device:
W's address ([n_out, n_in], any strides), its bias's ([n_out], contiguous), n_out <= Y, n_in <= X,
W's two strides; every tensor of x's dtype and kept alive by the caller. The kernel loads each slot's addresses from the table and
casts them to pointers (as lora_triton.py does), so a join or a leave copies no weights.

Per token t of slot k: out[t, :n_out] = W x[t, :n_in] + bias, summed in float32 and stored in out's
dtype; out[t, n_out:] untouched. A program takes a tile of BLOCK_M consecutive tokens (1 at decode,
16 at prefill) and BLOCK_N outputs, and loops over the distinct slots in its tile; products are
multiplies and `tl.sum` in float32 (not `tl.dot`, as in lora_triton.py), so within a tiling a
token's sums are the same whatever else is in its tile or batch. The decode and prefill tilings
block K differently, so a one-token row alone (decode tiling) and in a padded prefill group may
differ by a float32 rounding.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from server.kernels.lora_triton import _next_slot, _tile

COLUMNS = tl.constexpr(6)  # of the table: W, bias, n_out, n_in, W's stride along n_out, along n_in
DECODE = (1, 32, 64)  # BLOCK_M, BLOCK_N, BLOCK_K: one token per program
PREFILL = (16, 16, 32)  # a tile of 16 tokens: the [M, N, K] product stays at 8k lanes


def slot_linear(x: Tensor, out: Tensor, slot_of_token: Tensor, table: Tensor, tokens_per_row: int) -> None:
    """Write each token's projection into `out` (see the module docstring); `tokens_per_row` picks
    the tiling (1: decode)."""
    for name, t in (("x", x), ("out", out), ("slot_of_token", slot_of_token), ("table", table)):
        if not t.is_contiguous():  # the kernel indexes them densely
            raise ValueError(f"slot_linear: {name} must be contiguous, got strides {t.stride()}")
    n_tokens, width_in = x.shape
    width_out = out.shape[1]
    block_m, block_n, block_k = DECODE if tokens_per_row == 1 else PREFILL
    grid = (triton.cdiv(n_tokens, block_m), triton.cdiv(width_out, block_n))
    _linear[grid](x, out, slot_of_token, table, n_tokens, width_in, width_out,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


@triton.jit(do_not_specialize=("T", "X", "Y"))
def _linear(x_ptr, out_ptr, slot_ptr, table_ptr, T, X, Y,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, n0:n0+BLOCK_N] = W[n0:n0+BLOCK_N] x[t] + bias for the tile's tokens; n0 = program_id(1) · BLOCK_N."""
    rows, slots = _tile(slot_ptr, T, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    todo = slots >= 0
    while tl.sum(todo.to(tl.int32), axis=0) > 0:
        slot, mine = _next_slot(slots, todo)
        entry = table_ptr + slot.to(tl.int64) * COLUMNS
        n_out = tl.load(entry + 2)
        if tl.program_id(1) * BLOCK_N < n_out:
            n_in = tl.load(entry + 3)
            stride_out, stride_in = tl.load(entry + 4), tl.load(entry + 5)
            w_ptr = tl.load(entry).to(tl.pointer_type(x_ptr.dtype.element_ty))  # [n_out, n_in]
            bias_ptr = tl.load(entry + 1).to(tl.pointer_type(x_ptr.dtype.element_ty))  # [n_out]
            n_ok = cols < n_out
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, n_in, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
                k_ok = ks < n_in
                xt = tl.load(x_ptr + rows[:, None] * X + ks[None, :],
                             mask=mine[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
                wt = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_out + ks[None, :] * stride_in,
                             mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
                acc += tl.sum(xt[:, None, :] * wt[None, :, :], axis=2)
            bias = tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
            tl.store(out_ptr + rows[:, None] * Y + cols[None, :], (acc + bias[None, :]).to(out_ptr.dtype.element_ty),
                     mask=mine[:, None] & n_ok[None, :])
        todo = todo & ~mine
