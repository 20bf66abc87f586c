"""Micro-benchmark of the two ways to add per-row LoRA deltas in a mixed batch.

    python -m load_tests.lora_kernels [--threads 2] [--device cpu] [--dtype float32] [--cold]

Shapes of the bench model's attention (hidden 768, 12 heads, 4 KV heads: q/o 768->768,
k/v 768->256), 8 rows, r=16, decode (L=1) and prefill (L=32). For each batch composition it
prints the time of base q/k/v/o alone and the extra time of each strategy:

- grouped:  rows grouped by adapter; per group index_select, two matmuls, index_add
            (written here, for comparison only)
- gathered: BGMV style: per-row A/B stacked and zero-padded to the max rank at plan build,
            two torch.bmm per forward (ModuleDelta fed per-row copies, so it never shares)
- stacked:  server.adapters.lora_delta.ModuleDelta as the server builds it off the CPU kernel:
            gathered, except that rows sharing one adapter use its A/B as they are (two matmuls)
- slot:     server.adapters.lora_delta.SlotDelta (CPU, when the kernels are built): each row from its
            own adapter's weights by slot, server/kernels/lora_delta.cpp; prefill rows take `stacked`

and the plan build time of each. "+" columns time the delta alone, added in place to a
precomputed base output. Times are the minimum over repeated blocks (robust to other load on
the machine), in microseconds per layer (4 modules).

`--cold` (CPU) times instead the bench scenario's LoRA reads against the memory: 32 rows of 32
distinct adapters over the bench model's 48 modules (12 layers of q/k/v/o, r=16), each pass after
the cache is flushed, `slot` (float32 adapters, then the same saved in bfloat16, which the kernel
reads at half width) against `torch.dot` reading the float32 adapters' bytes from one buffer (the
fastest read of them this torch has), interleaved.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from server import kernels
from server.adapters.lora_delta import LoraWeights, ModuleDelta, SlotDelta

HIDDEN, KV = 768, 256
MODULES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN)}  # name: (in, out)
ROWS = 8
# name: the adapter index of each row (None: base row) and each adapter's rank
COMPOSITIONS = {
    "1 adapter x8": ([0] * 8, [16]),
    "2 adapters x4": ([0, 0, 0, 0, 1, 1, 1, 1], [16, 16]),
    "4 adapters x2": ([0, 0, 1, 1, 2, 2, 3, 3], [16] * 4),
    "8 adapters x1": (list(range(8)), [16] * 8),
    "3 adapters r8/16/32 + 2 base": ([None, 0, 1, None, 2, 0, 1, 2], [8, 16, 32]),
    "1 adapter x1 + 7 base": ([None] * 7 + [0], [16]),
}


@dataclass(frozen=True)
class Group:
    rows: Tensor | None  # [m] long; None: every row
    w: LoraWeights


def grouped_build(per_row: list[LoraWeights | None]) -> list[Group]:
    by_id: dict[int, tuple[LoraWeights, list[int]]] = {}
    for i, w in enumerate(per_row):
        if w is not None:
            by_id.setdefault(id(w), (w, []))[1].append(i)
    return [Group(None if len(ix) == len(per_row) else torch.tensor(ix, device=w.A.device), w)
            for w, ix in by_id.values()]


def grouped_apply(groups: list[Group], x: Tensor, out: Tensor) -> Tensor:
    for g in groups:
        xs = x if g.rows is None else x.index_select(0, g.rows)  # [m, L, in]
        delta = F.linear(F.linear(xs, g.w.A), g.w.B) * g.w.scale  # [m, L, r] -> [m, L, out]
        if g.rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, g.rows, delta)
    return out


def gathered_apply(delta: ModuleDelta | SlotDelta, x: Tensor, out: Tensor) -> Tensor:
    return delta.apply(x, out, None)


def best_us(fn: Callable[[], object], sync: Callable[[], None], blocks: int, per_block: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / per_block)
    return best * 1e6


def adapters_for(ranks: list[int], device: str, dtype: torch.dtype) -> list[dict[str, LoraWeights]]:
    gen = torch.Generator().manual_seed(0)
    return [{m: LoraWeights(torch.randn(r, i, generator=gen) * 0.02, torch.randn(o, r, generator=gen) * 0.02,
                            2.0).to(device, dtype) for m, (i, o) in MODULES.items()} for r in ranks]


def run(device: str, dtype: torch.dtype, blocks: int) -> list[str]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    weights = {m: torch.randn(o, i, device=device, dtype=dtype) * 0.02 for m, (i, o) in MODULES.items()}
    names = ["grouped", "gathered", "stacked"] + (["slot"] if device == "cpu" and kernels.cpu() is not None else [])
    header = ("| L | composition | base q/k/v/o | " + " | ".join(f"{n} +" for n in names) + " | "
              + " | ".join(f"build {n}" for n in names) + " |")
    lines = [header, "| --- " * (3 + 2 * len(names)) + "|"]
    for length in (1, 32):
        x = torch.randn(ROWS, length, HIDDEN, device=device, dtype=dtype)  # [N, L, in]
        base = {m: F.linear(x, w) for m, w in weights.items()}  # [N, L, out]
        scratch = {m: out.clone() for m, out in base.items()}  # timed deltas accumulate in these
        per_block = 200 if length == 1 else 50
        t_base = best_us(lambda x=x: [F.linear(x, w) for w in weights.values()], sync, blocks, per_block)
        for label, (row_adapter, ranks) in COMPOSITIONS.items():
            adapters = adapters_for(ranks, device, dtype)
            per_module = {m: [None if a is None else adapters[a][m] for a in row_adapter] for m in MODULES}
            copies = {m: [None if w is None else replace(w) for w in rows] for m, rows in per_module.items()}
            check = {m: grouped_apply(grouped_build(per_module[m]), x, base[m].clone()) for m in MODULES}
            strategies = {
                "grouped": (grouped_build, grouped_apply, per_module),
                "gathered": (ModuleDelta.build, gathered_apply, copies),
                "stacked": (ModuleDelta.build, gathered_apply, per_module),
                "slot": (SlotDelta.build, gathered_apply, per_module),
            }
            strategies = {n: strategies[n] for n in names}
            run_us, build_us = [], []
            for build, apply, inputs in strategies.values():
                plans = {m: build(rows) for m, rows in inputs.items()}
                for m in MODULES:
                    tol = 1e-2 if dtype != torch.float32 else 1e-5
                    torch.testing.assert_close(apply(plans[m], x, base[m].clone()), check[m], atol=tol, rtol=tol)
                run_us.append(best_us(lambda p=plans, a=apply, x=x, s=scratch: [a(p[m], x, s[m]) for m in MODULES],
                                      sync, blocks, per_block))
                build_us.append(best_us(lambda b=build, i=inputs: [b(r) for r in i.values()], sync, blocks, 20))
            cells = " | ".join(f"{t:.0f}" for t in run_us + build_us)
            lines.append(f"| {length} | {label} | {t_base:.0f} | {cells} |")
    return lines


def cold(rounds: int, passes: int = 6) -> list[str]:
    """The slot kernel over every module of 32 rows of 32 adapters, float32 and bfloat16-saved (read
    from their bfloat16 copies), and a dot over as many bytes as the float32 ones, cold."""
    rows, layers = 32, 12
    gen = torch.Generator().manual_seed(0)
    adapters = [{m: LoraWeights(torch.randn(16, i, generator=gen), torch.randn(o, 16, generator=gen), 2.0)
                 for m, (i, o) in MODULES.items()} for _ in range(rows * layers)]
    saved_bf16 = [{m: LoraWeights(w.A.bfloat16().float(), w.B.bfloat16().float(), w.scale).narrowed()
                   for m, w in a.items()} for a in adapters]

    def deltas(of: list[dict[str, LoraWeights]]) -> list[tuple[SlotDelta, Tensor, Tensor]]:
        return [(SlotDelta.build([of[layer * rows + r][m] for r in range(rows)]), torch.randn(rows, 1, i),
                 torch.zeros(rows, 1, o)) for layer in range(layers) for m, (i, o) in MODULES.items()]
    wide, narrow = deltas(adapters), deltas(saved_bf16)
    weight_bytes = sum(t.numel() * t.element_size() for a in adapters for w in a.values() for t in (w.A, w.B))
    flat = torch.randn(weight_bytes // 4)  # [bytes / 4] float32
    flush = torch.empty(300 * 2**20 // 4)  # written before each pass: more than the adapters and the buffer

    def best_ms(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(passes):
            flush.add_(1.0)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3
    lines = [f"{weight_bytes / 1e6:.0f} MB of float32 A and B (half as many bytes bfloat16-saved), cold; ms "
             f"(GB/s), best of {passes}",
             "| round | slot kernel, 48 modules | the same bfloat16-saved | torch.dot over the float32 bytes |",
             "| --- | --- | --- | --- |"]
    for i in range(rounds):
        slot = best_ms(lambda: [d.apply(x, out, None) for d, x, out in wide])
        half = best_ms(lambda: [d.apply(x, out, None) for d, x, out in narrow])
        dot = best_ms(lambda: torch.dot(flat, flat))
        lines.append(f"| {i} | {slot:.2f} ({weight_bytes / slot / 1e6:.1f}) | {half:.2f} "
                     f"({weight_bytes / 2 / half / 1e6:.1f}) | {dot:.2f} ({weight_bytes / dot / 1e6:.1f}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--cold", action="store_true", help="the bench scenario's LoRA reads against the memory (CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="with --cold")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        lines = cold(args.rounds) if args.cold else run(args.device, getattr(torch, args.dtype), args.blocks)
    what = "cold reads" if args.cold else f"device={args.device} dtype={args.dtype} (us per layer; '+' = added to base)"
    print(f"{what}, threads={args.threads}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
