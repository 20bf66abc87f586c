"""Decode attention straight from the paged KV cache on the CPU (server/kernels/paged_attention.cpp).

One query per row, each row over its own length, keys and values read where they lie in the block
pool: no gather into a `[rows, longest]` rectangle and no mask. Where the CPU kernels cannot be
built (server/kernels) the decoder gathers the rows' blocks and runs SDPA; CUDA always takes that
path.
"""
from __future__ import annotations

from torch import Tensor

from server import kernels


def decode(query: Tensor, pool_k: Tensor, pool_v: Tensor, table: Tensor, lengths: Tensor, scaling: float | None,
           sliding_window: int | None, softcap: float | None) -> Tensor:
    """query: [N, Hq, 1, D]; pools: [blocks, Hkv, B, D]; table: [N, W]; lengths: [N] keys each row sees
    -> [N, 1, Hq, D]."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = kernels.cpu().paged_decode(query[:, :, 0], pool_k, pool_v, table, lengths, scale, sliding_window or 0,
                                     softcap or 0.0)  # [N, Hq, D]
    return out[:, None]


def usable(query: Tensor) -> bool:
    """One query per row on the CPU, and the kernel built."""
    return query.shape[2] == 1 and query.is_cpu and kernels.cpu() is not None

