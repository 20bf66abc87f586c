"""CUDA graphs for decode steps: a step's hundreds of kernel launches replayed as one graph.

A decode step of a large model on a GPU is mostly launches (each layer's GEMMs, norms, rotary,
cache writes, attention) that the host issues one by one; a captured graph replays them with one
call. A graph is captured per bucket: the rows padded up to a power of two (at most
--max-batch-size) and the block-table width up to a power of two of blocks (at most a whole
context). It reads its inputs from static buffers (`StepBuffers`: ids, positions, lengths, where
each new k/v goes, the block table) that each step refills with one copy from the host; padding
rows write their k/v to the sink block and read the null block, so they touch no row's values.
Buckets are captured lazily, on the first step that needs them, into one shared memory pool. A
graph ends at the final hidden states: the head runs eagerly (one GEMM), so no bucket holds a
[rows, vocabulary] output of its own.

Which steps: those where every row is base, merged LoRA or a soft prompt (which at decode is the
base's computation over its own cache). Such a forward reads only the model's weights (a merge
changes them in place), the KV pool and the step's buffers. Steps with unmerged LoRA or bottleneck
rows run eagerly: their plans' slot tables are tensors of each batch composition, which a graph
would bake in.

Each new graph is checked once: its first replay must give the logits the eager forward gives on
the same buffers (a capture that raises, or differs, turns graphs off for good with one warning:
eager decoding serves). A reallocated KV pool (on CUDA it is allocated once; engine/cache.py) drops
every graph. `--cuda-graphs false` turns them off.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from server.engine.batch import Batch
from server.engine.cache import KVCache, StepShape
from server.engine.prefill import Prefiller
from server.residual import PLAIN

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-3  # max |graph − eager| / (1 + |eager|) of a first replay: the same kernels give 0


class Graph(Protocol):
    out: Tensor  # [R, H] the final hidden states a replay writes

    def replay(self) -> None: ...


Capture = Callable[[Callable[[], Tensor]], Graph]  # a forward -> its graph, with `out` its result


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most `cap` (n <= cap)."""
    return min(1 << (n - 1).bit_length(), cap)


@dataclass(frozen=True)
class StepBuffers:
    """A decode bucket's inputs on the device: R rows, tables W blocks wide, one flat long tensor laid
    out as `KVCache.decode_inputs` packs it, so one copy refills it; the views are what the forward reads."""

    flat: Tensor  # [5 R + R W] long
    ids: Tensor  # [R, 1] each row's last token
    shape: StepShape

    @staticmethod
    def allocate(rows: int, width: int, cache: KVCache) -> StepBuffers:
        flat = torch.zeros(5 * rows + rows * width, dtype=torch.long, device=cache.device)
        ids, starts, lengths, blocks, offsets = flat[: 5 * rows].view(5, rows)  # [R] each
        table = flat[5 * rows :].view(rows, width)  # [R, W]
        shape = StepShape(starts, starts.view(rows, 1), width * cache.block_tokens, False, lengths, blocks, offsets,
                          table)
        return StepBuffers(flat, ids.view(rows, 1), shape)

    def fill(self, packed: Tensor) -> None:
        """packed: [5 R + R W] long on the host, from `KVCache.decode_inputs`."""
        self.flat.copy_(packed)


def cuda_capture(pool) -> Capture:
    """Capture on CUDA into the memory pool `pool` (torch.cuda.graph_pool_handle())."""

    def capture(forward: Callable[[], Tensor]) -> Graph:
        return _CudaGraph(forward, pool)

    return capture


class _CudaGraph:
    def __init__(self, forward: Callable[[], Tensor], pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisations (cuBLAS workspaces, ...) happen outside the capture
            forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = forward()

    def replay(self) -> None:
        self.graph.replay()


@dataclass(frozen=True)
class _Captured:
    buffers: StepBuffers
    graph: Graph


class DecodeGraphs:
    """The engine's decode graphs, by bucket (see the module docstring)."""

    def __init__(self, prefiller: Prefiller, max_rows: int, capture: Capture) -> None:
        self.prefiller = prefiller
        self.cache = prefiller.cache
        self.max_rows = max_rows
        self.max_width = self.cache.blocks_for(self.cache.max_len)
        self.capture = capture
        self.on = True
        self._graphs: dict[tuple[int, int], _Captured] = {}  # by (rows, width)
        self._pool = self.cache.pool.data_ptr()  # the KV pool they read

    def serves(self, batch: Batch) -> bool:
        """Whether this step's rows can replay a graph: no unmerged LoRA, no bottleneck row."""
        plans = batch.plans()
        return self.on and plans.lora is None and plans.residual is PLAIN

    def logits(self, batch: Batch) -> Tensor:
        """The batch's next-token logits [N, V], by the bucket's graph (captured and checked first if new)."""
        n = len(batch)
        rows = bucket(n, self.max_rows)
        width = bucket(self.cache.blocks_for(max(batch.lengths) + 1), self.max_width)
        packed = self.cache.decode_inputs([r.kv for r in batch.rows], batch.lengths,
                                          [r.output_ids[-1] for r in batch.rows], rows, width)  # may grow the pool
        if self.cache.pool.data_ptr() != self._pool:  # it grew: the graphs read the old one
            self._graphs.clear()
            self._pool = self.cache.pool.data_ptr()
        captured = self._graphs.get((rows, width))
        if captured is None:
            return self.prefiller.decoder.logits(self._first(rows, width, packed)[:n])
        captured.buffers.fill(packed)
        captured.graph.replay()
        return self.prefiller.decoder.logits(captured.graph.out[:n])

    def _first(self, rows: int, width: int, packed: Tensor) -> Tensor:
        """Capture the bucket's graph and check its first replay against the eager forward; -> the eager
        final hidden states [R, H]."""
        buffers = StepBuffers.allocate(rows, width, self.cache)
        buffers.fill(packed)

        def forward() -> Tensor:
            return self.prefiller.decode_plain(buffers.ids, buffers.shape)  # [R, H]

        want = forward()
        try:
            graph = self.capture(forward)
            graph.replay()
            error = ((graph.out - want).abs() / (1 + want.abs())).max().item()
        except Exception as exc:  # noqa: BLE001 - e.g. an op that syncs the host: eager decoding serves
            self._off(f"capturing {rows} rows x {width} blocks raised {exc!r}")
            return want
        if not error <= CHECK_TOLERANCE:
            self._off(f"{rows} rows x {width} blocks: a replay differs from the eager step by {error:.3g}")
            return want
        self._graphs[(rows, width)] = _Captured(buffers, graph)
        return want

    def _off(self, why: str) -> None:
        log.warning("CUDA graphs off (%s); decode steps run eagerly", why)
        self.on = False
        self._graphs.clear()
