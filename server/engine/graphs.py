"""CUDA graphs for decode steps: a step's hundreds of kernel launches replayed as one graph.

A decode step of a large model on a GPU is mostly launches (each layer's GEMMs, norms, rotary,
cache writes, attention) that the host issues one by one; a captured graph replays them with one
call. A graph is captured per bucket: the rows padded up to a power of two (at most
--max-batch-size) and the block-table width up to a power of two of blocks (at most a whole
context). It reads its inputs from static buffers (`StepBuffers`: ids, positions, lengths, where
each new k/v goes, the block table) that each step refills with one copy from the host; padding
rows write their k/v to the sink block and read the null block, so they touch no row's values.
Buckets are captured lazily, on the first step that needs them, into one shared memory pool (the
smallest, one row of one block, when the engine starts: a capture that fails shows then). A
graph ends at the final hidden states: the head runs eagerly (one GEMM), so no bucket holds a
[rows, vocabulary] output of its own.

Which steps: those whose rows are base, merged LoRA, soft prompts (at decode the base's
computation over their own cache) or unmerged LoRA by slot. Such a forward reads only the model's
weights (a merge changes them in place), the KV pool, the step's buffers and, with unmerged LoRA,
the slot tables: a graph's own static `SlotTables` (each row's slot, each module's slot entries),
refilled in place when the batch's composition changes, so one graph serves every composition of
the same layout (modules, their widest rank, DoRA). Steps with bottleneck or aLoRA rows run
eagerly (their hooks and gates are per-composition tensors and Python), and so do a LoRA step's
measured ones (1 in 32 on CUDA: engine/clock.py times the adapter regions).

Each new graph's first CHECKED_REPLAYS replays are checked against the eager forward on the same
buffers: the capture's own inputs (an empty or broken capture) and the next step's (a value baked
in at capture); the output is filled with NaN before each, so a replay that writes nothing fails.
A capture that raises, or a replay that differs, turns graphs off for good with one warning: eager
decoding serves. Models whose forward branches on the host (dynamic RoPE resizing its cache, MoE
routing) are not captured at all (`uncapturable`). A reallocated KV pool (on CUDA it is allocated
once; engine/cache.py) drops every graph. `--no-cuda-graphs` turns them off.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor, nn

from server.adapters.lora import LoraPlan
from server.adapters.lora_delta import CHECK_TOLERANCE, SlotDelta, SlotTables, TritonDelta
from server.engine.batch import NO_ADAPTERS, Batch, Plans
from server.engine.cache import BlockTable, KVCache, StepShape
from server.engine.prefill import Prefiller
from server.residual import PLAIN

log = logging.getLogger(__name__)

CHECKED_REPLAYS = 2  # of each graph: on the inputs it was captured with, then on the next step's
MIN_RANK = 16  # the least R a graph's LoRA kernels are captured with
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")  # configs' expert counts


class Graph(Protocol):
    out: Tensor  # [R, H] the final hidden states a replay writes

    def replay(self) -> None: ...


Capture = Callable[[Callable[[], Tensor]], Graph]  # a forward -> its graph, with `out` its result


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most `cap` (n <= cap)."""
    return min(1 << (n - 1).bit_length(), cap)


def uncapturable(model: nn.Module) -> str | None:
    """Why the model's decode forward cannot be captured (it asks the host mid-forward), or None."""
    if any(getattr(model.config, name, 0) for name in MOE_FIELDS):
        return "MoE routing picks its experts on the host"
    if any(getattr(m, "rope_type", None) == "dynamic" for m in model.modules()):
        return "dynamic RoPE resizes its cache on the host"
    return None


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


def cuda_capture(device: torch.device) -> Capture:
    """Capture on `device` (the engine thread's current device), every graph into one memory pool."""
    pool = torch.cuda.graph_pool_handle()

    def capture(forward: Callable[[], Tensor]) -> Graph:
        return _CudaGraph(forward, device, pool)

    return capture


class _CudaGraph:
    def __init__(self, forward: Callable[[], Tensor], device: torch.device, pool) -> None:
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):  # left whatever the capture raises: the thread's stream is restored
            forward()  # lazy initialisations (cuBLAS workspaces, ...) happen before the capture
            torch.cuda.synchronize(device)
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.out = forward()
            finally:
                self.graph.capture_end()
        current.wait_stream(side)

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Captured:
    buffers: StepBuffers
    lora: SlotTables | None  # the static slot tables its LoRA deltas read
    graph: Graph
    forward: Callable[[], Tensor]  # the eager forward over `buffers` (and `lora`)
    plans: weakref.ref[Plans]  # whose slot tables `lora` holds (weak: an evicted adapter's weights go)
    checks_left: int = CHECKED_REPLAYS


Key = tuple  # (rows, width, the LoRA plan's layout or None)


class DecodeGraphs:
    """The engine's decode graphs, by bucket (see the module docstring)."""

    def __init__(self, prefiller: Prefiller, max_rows: int, capture: Capture) -> None:
        self.prefiller = prefiller
        self.cache = prefiller.cache
        self.max_rows = max_rows
        self.max_width = self.cache.blocks_for(self.cache.max_len)
        self.capture = capture
        self.on = True
        self._graphs: dict[Key, _Captured] = {}
        self._generation = self.cache.generation  # of the KV pool they read
        self._layout: tuple[weakref.ref[Plans], tuple | None] = (lambda: None, None)  # the last plans' layout

    def warm_up(self) -> None:
        """Capture the smallest bucket (one row, one block, no LoRA) over a scratch row and check its
        first replay, so that a capture that fails shows when the server starts (one warning, eager
        decoding from then on), not at the first request. The bucket then serves steps of one short row."""
        table = BlockTable()
        try:
            self._capture((1, 1, None), self.cache.decode_inputs([table], [0], [0], 1, 1), NO_ADAPTERS)
        except Exception as exc:  # noqa: BLE001 - the eager step itself raised: graphs off, the engine starts
            self._off(f"the start-up capture's eager step raised {exc!r}")
        finally:
            self.cache.release(table)

    def serves(self, batch: Batch, measured: bool) -> bool:
        """Whether this step's rows can replay a graph: no bottleneck or aLoRA row, and unmerged LoRA
        rows only where every module's delta is by slot over one SlotTables, and not on a step whose
        adapter time is measured (engine/clock.py: its regions are timed eagerly)."""
        plans = batch.plans()
        if not self.on or plans.residual is not PLAIN or plans.lora_starts is not None:
            return False
        return plans.lora is None or (not measured and self._layout_of(plans) is not None)

    def _layout_of(self, plans: Plans) -> tuple | None:
        """`_layout` of the plans' LoRA, computed once per composition."""
        if self._layout[0]() is not plans:
            self._layout = weakref.ref(plans), _layout(plans.lora, self.prefiller.base.dtype)
        return self._layout[1]

    def logits(self, batch: Batch) -> Tensor:
        """The batch's next-token logits [N, V], by the bucket's graph (captured first if new)."""
        n, plans = len(batch), batch.plans()
        rows = bucket(n, self.max_rows)
        width = bucket(self.cache.blocks_for(max(batch.lengths) + 1), self.max_width)
        packed = self.cache.decode_inputs([r.kv for r in batch.rows], batch.lengths,
                                          [r.output_ids[-1] for r in batch.rows], rows, width)  # may grow the pool
        if self.cache.generation != self._generation:  # it grew: the graphs read the old one
            self._graphs.clear()
            self._generation = self.cache.generation
        key = rows, width, plans.lora and self._layout_of(plans)
        captured = self._graphs.get(key)
        if captured is None:
            hidden = self._capture(key, packed, plans)
        else:
            captured.buffers.fill(packed)
            if captured.lora is not None and captured.plans() is not plans:  # another composition: its slots, tables
                captured.lora.fill(_tables(plans.lora))
                captured.plans = weakref.ref(plans)
            hidden = self._replay(key, captured)
        return self.prefiller.head(hidden[:n], plans.lora)  # a replay left the LoRA context as it was

    def _capture(self, key: Key, packed: Tensor, plans: Plans) -> Tensor:
        """Capture the bucket's graph and replay it, checked; -> the final hidden states [R, H]."""
        rows, width = key[:2]
        buffers = StepBuffers.allocate(rows, width, self.cache)
        buffers.fill(packed)
        lora, plan = _static(plans.lora, rows)

        def forward() -> Tensor:
            return self.prefiller.decode_plain(buffers.ids, buffers.shape, plan)  # [R, H]

        try:
            graph = self.capture(forward)
        except Exception as exc:  # noqa: BLE001 - e.g. an op that syncs the host: eager decoding serves
            cause = f" after {exc.__context__!r}" if exc.__context__ is not None else ""
            self._off(f"capturing {rows} rows x {width} blocks raised {exc!r}{cause}")
            return forward()
        self._graphs[key] = captured = _Captured(buffers, lora, graph, forward, weakref.ref(plans))
        return self._replay(key, captured)

    def _replay(self, key: Key, captured: _Captured) -> Tensor:
        """Replay the bucket's graph (its first ones checked against the eager forward); -> [R, H]."""
        out = captured.graph.out
        if not captured.checks_left:
            captured.graph.replay()
            return out
        captured.checks_left -= 1
        out.fill_(float("nan"))
        captured.graph.replay()
        want = captured.forward()  # the same k/v written again, the same values
        if (error := _difference(out, want)) > CHECK_TOLERANCE.get(want.dtype, 0.0):
            self._off(f"{key[0]} rows x {key[1]} blocks: a replay differs from the eager step by {error:.3g}")
        return want

    def _off(self, why: str) -> None:
        log.warning("CUDA graphs off (%s); decode steps run eagerly", why)
        self.on = False
        self._graphs.clear()


def _difference(got: Tensor, want: Tensor) -> float:
    """max |got − want| / (1 + |want|) where `want` is finite; inf where only one of them is."""
    finite = want.isfinite()
    if not torch.equal(finite, got.isfinite()):
        return float("inf")
    return torch.where(finite, (got - want).abs() / (1 + want.abs()), 0).max().item()


def _layout(plan: LoraPlan, dtype: torch.dtype) -> tuple | None:
    """What a graph bakes in of a LoRA plan: per module its kind, row of the tables, DoRA and widest
    rank. None where a graph cannot serve it: fused experts, a stacked or gated module, deltas over
    more than one SlotTables, weights of another dtype than the model's."""
    deltas = list(plan.modules.values())
    if plan.experts or not all(isinstance(d, SlotDelta | TritonDelta) and not d.gated and d.dtype == dtype
                               for d in deltas):
        return None
    if len({id(d.tables) for d in deltas}) != 1:
        return None
    return tuple(sorted((name, type(d).__name__, d.index, d.dora, _rank_bucket(d.max_rank))
                        for name, d in plan.modules.items()))


def _rank_bucket(rank: int) -> int:
    """The R a graph's LoRA kernels are captured with: a power of two, at least MIN_RANK (adapters of
    ranks 8 and 16 share graphs; a slot's programs stop at its own rank)."""
    return max(MIN_RANK, 1 << (rank - 1).bit_length())


def _tables(plan: LoraPlan) -> SlotTables:
    return next(iter(plan.modules.values())).tables


def _static(plan: LoraPlan | None, rows: int) -> tuple[SlotTables | None, LoraPlan | None]:
    """Static slot tables for `rows` rows holding `plan`'s, and a plan of the same deltas over them
    (no weights kept: those of later compositions come through the tables)."""
    if plan is None:
        return None, None
    tables = _tables(plan).blank(rows)
    tables.fill(_tables(plan))
    return tables, LoraPlan(rows, {name: replace(d, tables=tables, weights=(), slots=(),
                                                 max_rank=_rank_bucket(d.max_rank))
                                   for name, d in plan.modules.items()}, {})
