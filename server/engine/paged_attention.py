"""Decode attention straight from the paged KV cache on the CPU (paged_attention.cpp).

One query per row, each row over its own length, keys and values read where they lie in the block
pool: no gather into a `[rows, longest]` rectangle and no mask. Built with the machine's C++
compiler on first use (about a minute, then cached by torch under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR). Where it cannot be built the decoder gathers the rows' blocks and runs SDPA,
with one warning in the log; CUDA always takes that path.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def kernel():
    """The compiled extension, or None where it cannot be built (logged once)."""
    try:
        from torch.utils import cpp_extension  # imported here: it pulls in setuptools
        if shutil.which("ninja") is None:  # torch builds with ninja: the pip package's, when none is on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return cpp_extension.load("hotswap_paged_attention", [str(SOURCE)], extra_ldflags=["-fopenmp"],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the gather path serves
        log.warning("paged-attention CPU kernel unavailable (%s); decode attention gathers blocks instead", exc)
        return None


def decode(query: Tensor, pool_k: Tensor, pool_v: Tensor, table: Tensor, lengths: Tensor, scaling: float | None,
           sliding_window: int | None, softcap: float | None) -> Tensor:
    """query: [N, Hq, 1, D]; pools: [blocks, Hkv, B, D]; table: [N, W]; lengths: [N] keys each row sees
    -> [N, 1, Hq, D]."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = kernel().paged_decode(query[:, :, 0], pool_k, pool_v, table, lengths, scale, sliding_window or 0,
                                softcap or 0.0)  # [N, Hq, D]
    return out[:, None]


def usable(query: Tensor) -> bool:
    """One query per row on the CPU, and the kernel built."""
    return query.shape[2] == 1 and query.is_cpu and kernel() is not None


if __name__ == "__main__":  # `make test` builds it once up front, not inside the first server's start-up
    logging.basicConfig(level=logging.INFO)
    log.info("paged-attention CPU kernel: %s", "built" if kernel() is not None else "unavailable (gather path)")
