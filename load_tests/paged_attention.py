"""Decode attention over the paged KV cache, three ways, interleaved: what one layer's attention costs.

    python -m load_tests.paged_attention [--threads 2] [--rounds 40]

Bench-model shapes (12 query heads, 4 KV heads, head size 64, 16-token blocks), rows of staggered
lengths (each row 0..6 tokens shorter than the longest). For each (rows, context):
- `rectangle`: SDPA over a dense contiguous [rows, Hkv, longest, D] with a mask (the cache before
  it was paged: no copy, every row padded to the longest);
- `gather`: the rows' blocks gathered into that rectangle each step, then SDPA (what CUDA and
  prefills past position 0 do);
- `kernel`: server/kernels/paged_attention.cpp, each row over its own length, from the blocks.
Medians in microseconds per layer (k and v), the three timed in turn within each round.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from server import kernels
from server.engine import paged_attention

HQ, HKV, D, BLOCK = 12, 4, 64, 16
CASES = ((8, 96), (32, 96), (32, 512), (32, 2048))


def case(rows: int, context: int, rounds: int) -> dict[str, float]:
    width = context // BLOCK
    gen = torch.Generator().manual_seed(0)
    table = (torch.randperm(rows * width + 8, generator=gen)[: rows * width].view(rows, width) + 2).contiguous()
    pool_k = torch.randn(rows * width + 10, HKV, BLOCK, D, generator=gen)  # [blocks, Hkv, B, D]
    pool_v = torch.randn_like(pool_k)
    lengths = torch.tensor([context - i % 7 for i in range(rows)])  # [N]
    q = torch.randn(rows, 1, HQ, D, generator=gen).transpose(1, 2)  # [N, Hq, 1, D], as transformers passes it
    mask = (torch.arange(context)[None, :] < lengths[:, None])[:, None, None, :]  # [N, 1, 1, T]

    def gathered(pool):
        blocks = pool.index_select(0, table.view(-1)).view(rows, width, HKV, BLOCK, D)
        return blocks.transpose(1, 2).reshape(rows, HKV, context, D)  # [N, Hkv, T, D]

    dense_k, dense_v = gathered(pool_k), gathered(pool_v)
    ways = {
        "rectangle": lambda: F.scaled_dot_product_attention(q, dense_k, dense_v, attn_mask=mask, enable_gqa=True),
        "gather": lambda: F.scaled_dot_product_attention(q, gathered(pool_k), gathered(pool_v), attn_mask=mask,
                                                         enable_gqa=True),
        "kernel": lambda: paged_attention.decode(q, pool_k, pool_v, table, lengths, None, None, None),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):
        for way in ways.values():
            way()
    for _ in range(rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.cpu() is None:
        raise SystemExit("the paged-attention kernel could not be built here (see the log)")
    print("| rows | context | rectangle (us) | gather (us) | kernel (us) | kernel / rectangle |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for rows, context in CASES:
            t = case(rows, context, args.rounds)
            print(f"| {rows} | {context} | {t['rectangle']:.0f} | {t['gather']:.0f} | {t['kernel']:.0f} | "
                  f"{t['kernel'] / t['rectangle']:.2f}x |")


if __name__ == "__main__":
    main()
