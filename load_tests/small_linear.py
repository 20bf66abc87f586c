"""Micro-benchmark of the CPU float32 linear layer over few rows: oneDNN's matmul against
server/kernels/small_linear.cpp, on the bench model's linears.

    python -m load_tests.small_linear [--threads 2] [--rows 1 2 3 4 8] [--repeats 15]

The 84 linears of the bench model's 12 layers (q/o 768->768, k/v 768->256, gate/up 768->2048,
down 2048->768; 302 MB of float32 weights), each called once per pass
as a decode step calls them, with M rows. Both ways run in turn, pass by pass (this machine drifts);
each prints the median pass and the weight bytes it streamed per second.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from server import kernels

HIDDEN, KV, FFN, LAYERS = 768, 256, 2048, 12
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN),
          (HIDDEN, FFN)] * LAYERS  # (out, in) per linear, in a layer's order
Linear = Callable[[Tensor, Tensor], Tensor]


def onednn(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def small(x: Tensor, weight: Tensor) -> Tensor:
    return kernels.cpu().small_linear(x, weight, kernels.NONE)


def one_pass(linear: Linear, weights: list[Tensor], inputs: dict[int, Tensor]) -> float:
    t0 = time.perf_counter()
    for w in weights:
        linear(inputs[w.shape[1]], w)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=gen) * 0.02 for out, inp in SHAPES]
    total = sum(w.numel() * w.element_size() for w in weights)
    ways = {"oneDNN": onednn} | ({"small_linear": small} if kernels.cpu() is not None else {})
    print(f"{len(weights)} linears, {total / 1e6:.0f} MB, {args.threads} threads")
    for rows in args.rows:
        inputs = {n: torch.randn(rows, n, generator=gen) for n in (HIDDEN, FFN)}
        ways_here = ways if rows <= 4 else {"oneDNN": onednn}  # the kernel takes 1-4 rows
        times: dict[str, list[float]] = {name: [] for name in ways_here}
        for _ in range(args.repeats):
            for name, linear in ways_here.items():
                times[name].append(one_pass(linear, weights, inputs))
        line = [f"M={rows}:"]
        for name, ts in times.items():
            median = sorted(ts)[len(ts) // 2]
            line.append(f"{name} {median * 1e3:6.2f} ms ({total / median / 1e9:4.1f} GB/s)")
        print("  ".join(line))


if __name__ == "__main__":
    main()
