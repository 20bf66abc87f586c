"""A wrapped module's LoRA: its weights, and the per-row delta of one batch composition, three ways.

    SlotDelta    CPU, one token per row (decode): a slot table. Each distinct adapter of the batch
                 is a slot (at each module the addresses of its A, B, shift and DoRA g, rank 0 where
                 it has no LoRA; nothing copied), each row holds a slot index, and
                 server/kernels/lora_delta.cpp computes every row from its own adapter's weights
                 where they lie (BGMV). The modules of a batch share one `slot_of_row` and views of
                 one [modules, slots, 6] table (`slot_deltas`), so a join or a leave builds two
                 tensors (32 rows of 32 adapters over 48 modules: 1.3 ms); a row's delta is the same
                 whatever else is in the batch.
    TritonDelta  CUDA with triton, any tokens per row (decode and prefill): the same slot table, on
                 the device, read by server/kernels/lora_triton.py (every token carries its row's
                 slot; shrink to each slot's own rank, then expand). Chosen once the kernels have
                 matched ModuleDelta on a small problem on the device (`triton_serves`, checked
                 once per device and dtype; else one warning and ModuleDelta). Not measured on a GPU.
    ModuleDelta  anywhere else (CPU prefill, no compiler or triton, float64): gather-batched. The
                 A/B of every row with a delta are stacked (s folded into B) and zero-padded to the
                 batch's largest rank; a forward is one `index_select` (none when every row has a
                 delta), two `torch.bmm` and one in-place add. When every such row has the same
                 adapter its A and s·B are used as they are: two matmuls over all tokens, no copies.

`python -m load_tests.lora_kernels` (bench shapes q/o 768->768, k/v 768->256, 8 rows, r=16; µs per
layer of 4 modules, weights in cache, fp32, 2 threads of the AVX-512 dev VM; base q/k/v/o 180):

    decode (L=1)                 stacked   slot      plan build: stacked   slot
    1 adapter on all 8 rows         35       31                      19      44
    8 adapters                      71       35                     439      69
    3 adapters r8/16/32 + 2 base   148       36                     707      50

With the weights streamed from memory (the engine: 8 rows of 8 adapters, 32 of 32) the kernel is
bound by the memory's bandwidth (32 rows of 32 adapters read 126 MB a step: ~6 ms on the dev VM).
So where A and B are float32 values bfloat16 holds exactly (a LoRA saved in bf16, on a float32
base), the kernel reads bfloat16 copies of them instead (`LoraWeights.narrowed`): half the bytes,
the same float32 sums up to their vector blocking.
Prefill (32 tokens a row) runs as GEMMs better than as the kernel's dots, so a SlotDelta builds its
stacked form, once, when more than one token per row comes.

Grouping rows by adapter (index, two matmuls, index_add per adapter) grows with the number of
adapters; none of the ways here does (on an H200 in bf16, launch-bound: grouped 224-1710 µs vs stacked
142-191 µs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from functools import cache, cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from server import kernels
from server.adapters.slots import assign_slots

log = logging.getLogger(__name__)

TABLE_COLUMNS = 6  # of a slot table: A, B, r, shift, DoRA g, A's and B's dtype (LoraWeights.entry)
NARROW = ("narrow_A", "narrow_Bt")  # LoraWeights' fields that `narrowed` derives


@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA, ready to serve. Shapes use the nn.Linear convention even for Conv1D."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r], stored column-major (Bᵀ contiguous), as both slot kernels stream it
    scale: float  # s = alpha / r (rsLoRA: alpha / sqrt(r))
    dora_scale: Tensor | None = None  # [out] DoRA g = magnitude / ‖W + s·BA‖ of the pristine base
    lora_bias: Tensor | None = None  # [out] bias of lora_B (merged as s·b_B)
    base_bias: Tensor | None = None  # [out] b': replaces the base layer's bias
    shift: Tensor | None = None  # [out] s·b_B + (b' − b): what an unmerged row adds besides B(A x)
    narrow_A: Tensor | None = None  # [r, in] bfloat16 copy of a float32 A that bfloat16 holds exactly
    narrow_Bt: Tensor | None = None  # [r, out] the same of Bᵀ: what the CPU slot kernel reads (`narrowed`)

    def __post_init__(self) -> None:
        if not self.B.T.is_contiguous():
            object.__setattr__(self, "B", self.B.T.contiguous().T)  # same values, Bᵀ's layout

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @cached_property
    def kernel_place(self) -> tuple[torch.dtype, torch.device] | None:
        """(dtype, device) where the slot kernels can read it: A, shift and g contiguous, B column-major
        (as stored), all in one dtype, on one device; else None."""
        vectors = [t for t in (self.A, self.B.T, self.shift, self.dora_scale) if t is not None]
        ok = all(t.is_contiguous() and t.dtype == self.A.dtype and t.device == self.A.device for t in vectors)
        return (self.A.dtype, self.A.device) if ok else None

    @cached_property
    def entry(self) -> list[int]:
        """Its row of a slot table: the addresses of A, B (column-major), r, of shift and DoRA g (0:
        none), and A's and B's dtype (0: A's)."""
        return [self.A.data_ptr(), self.B.data_ptr(), self.rank, _address(self.shift), _address(self.dora_scale), 0]

    @cached_property
    def cpu_entry(self) -> list[int]:
        """`entry` as the CPU kernel reads it: A and Bᵀ from their bfloat16 copies where it has them (dtype 1)."""
        if self.narrow_A is None:
            return self.entry
        return [self.narrow_A.data_ptr(), self.narrow_Bt.data_ptr(), *self.entry[2:5], 1]

    def tensors(self) -> list[Tensor]:
        return [t for f in fields(self) if isinstance(t := getattr(self, f.name), Tensor)]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraWeights:
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NARROW}
        for key, value in moved.items():
            if isinstance(value, Tensor):
                moved[key] = value.to(device=device, dtype=dtype)
        return LoraWeights(**moved).narrowed()

    def narrowed(self) -> LoraWeights:
        """These weights with bfloat16 copies of A and Bᵀ for the CPU slot kernel, where A and B are
        float32 values that bfloat16 holds exactly (an adapter saved in bfloat16): the kernel reads half
        the bytes and computes the same float32 sums (up to their vector blocking). A decode step of many adapters is bound by reading
        their A and B (load_tests/lora_kernels.py --cold); every other path keeps reading A and B."""
        if not (self.A.is_cpu and self.A.dtype == torch.float32 and kernels.cpu() is not None):
            return self
        a, bt = self.A.to(torch.bfloat16), self.B.T.to(torch.bfloat16)  # [r, in], [r, out]
        if not (torch.equal(a.float(), self.A) and torch.equal(bt.float(), self.B.T)):
            return self
        return replace(self, narrow_A=a, narrow_Bt=bt)


@dataclass(frozen=True)
class ModuleDelta:
    """The per-row delta of one wrapped module for one batch composition."""

    rows: Tensor | None  # [M] long: rows with a delta here; None = all N rows, in order
    A: Tensor  # [M, R, in]: each row's A zero-padded to the max rank R; [r, in] when all M rows share one
    B: Tensor  # [M, out, R]: each row's s·B, zero-padded; [out, r] when shared
    shift: Tensor | None  # [M, 1, out] (or [out]): each row's `shift`, zeros where none; None if none
    dora: Tensor | None  # [M, 1, out] (or [out]): each row's DoRA g, ones on plain rows; None if no DoRA
    gated: bool = False  # an aLoRA row is among them: the context's gate says where their deltas apply

    def apply(self, x: Tensor, out: Tensor, base_bias: Tensor | None, gate: Tensor | None = None) -> Tensor:
        """Add the delta to `out` = base_layer(x) in place and return it; `gate` [N, L, 1] bool: where
        each row's delta applies (None: everywhere)."""
        gate = gate if self.gated else None
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, in]
        out3 = out.view(out.shape[0], -1, out.shape[-1])  # [N, L, out], shares out's storage
        xs = x3 if self.rows is None else x3.index_select(0, self.rows)  # [M, L, in]
        if self.A.dim() == 2:  # one adapter: two matmuls folded over all M·L tokens
            delta = F.linear(F.linear(xs, self.A), self.B)  # [M, L, r] -> [M, L, out]
        else:
            delta = torch.bmm(torch.bmm(xs, self.A.mT), self.B.mT)  # [M, L, R] -> [M, L, out]
        if self.dora is not None:
            base = out3 if self.rows is None else out3.index_select(0, self.rows)  # [M, L, out]
            xw = base if base_bias is None else base - base_bias  # x Wᵀ, [M, L, out]
            delta = (self.dora - 1) * xw + self.dora * delta
        if self.shift is not None:
            delta = delta + self.shift
        if gate is not None:  # exact zeros where an aLoRA row is not active yet
            delta = delta.masked_fill(~(gate if self.rows is None else gate.index_select(0, self.rows)), 0.0)
        if self.rows is None:
            out3.add_(delta)
        else:
            out3.index_add_(0, self.rows, delta)
        return out

    @property
    def device(self) -> torch.device:
        return self.A.device

    @staticmethod
    def build(per_row: list[LoraWeights | None], gated: bool = False) -> ModuleDelta:
        """per_row[i]: row i's weights for this module, None where it gets no delta."""
        idx = [i for i, w in enumerate(per_row) if w is not None]
        ws = [per_row[i] for i in idx]
        rows = None if len(idx) == len(per_row) else torch.tensor(idx, device=ws[0].A.device)
        if all(w is ws[0] for w in ws):  # one adapter: no per-row copies
            return ModuleDelta(rows, ws[0].A, ws[0].B * ws[0].scale, ws[0].shift, ws[0].dora_scale, gated)
        rank = max(w.rank for w in ws)
        a = torch.stack([w.A if w.rank == rank else F.pad(w.A, (0, 0, 0, rank - w.rank)) for w in ws])
        b = torch.stack([w.B if w.rank == rank else F.pad(w.B, (0, rank - w.rank)) for w in ws])
        scales = torch.tensor([w.scale for w in ws], device=b.device)[:, None, None]  # [M, 1, 1] fp32
        return ModuleDelta(rows, a, (b * scales).to(b.dtype),
                           _per_row(ws, "shift", 0.0), _per_row(ws, "dora_scale", 1.0), gated)


def _per_row(ws: list[LoraWeights], name: str, fill: float) -> Tensor | None:
    """Stack one optional [out] vector per row into [M, 1, out]; `fill` where a row has none."""
    vectors = [getattr(w, name) for w in ws]
    if all(v is None for v in vectors):
        return None
    like = next(v for v in vectors if v is not None)
    return torch.stack([like.new_full(like.shape, fill) if v is None else v for v in vectors]).unsqueeze(1)


@dataclass(frozen=True)
class SlotTables:
    """What the slot deltas of one batch share: each row's slot and every module's table."""

    slot_of_row: Tensor  # [N] row -> slot (long on the CPU, int32 on CUDA), -1: no LoRA
    table: Tensor  # [M, S, 6] long per module and slot: LoraWeights.entry (zeros: no LoRA there)
    scales: Tensor  # [M, S] float32: each slot's s at each module

    def blank(self, rows: int) -> SlotTables:
        """Tables of the same modules for up to `rows` rows and slots, no row with a slot (a CUDA
        graph's static buffers, engine/graphs.py)."""
        m = self.table.shape[0]
        return SlotTables(self.slot_of_row.new_full((rows,), -1), self.table.new_zeros((m, rows, TABLE_COLUMNS)),
                          self.scales.new_zeros((m, rows)))

    def fill(self, tables: SlotTables) -> None:
        """Hold `tables` (of the same modules, at most as many rows and slots) in place."""
        n, slots = tables.slot_of_row.shape[0], tables.table.shape[1]
        self.slot_of_row.fill_(-1)
        self.slot_of_row[:n] = tables.slot_of_row
        self.table.zero_()
        self.table[:, :slots] = tables.table
        self.scales[:, :slots] = tables.scales


@dataclass(frozen=True)
class _SlotTable:
    """A wrapped module's LoRA over a batch as a slot table: each distinct adapter of the batch a slot
    (its addresses here; nothing copied), each row a slot index. SlotDelta and TritonDelta read it.
    The modules of one batch share their `SlotTables` (`slot_deltas`)."""

    weights: tuple[LoraWeights | None, ...]  # slot k's weights here, None where its adapter has no LoRA here
    slots: tuple[int, ...]  # row i's slot, -1: none (what slot_of_row holds, on the host)
    tables: SlotTables  # the batch's
    index: int  # this module's in `tables`
    dtype: torch.dtype  # of every tensor the table points at
    dora: bool  # a slot has DoRA's g: the kernel needs the base bias
    max_rank: int  # R: the widest of the slots' s·A x (the Triton kernels keep it between their launches)
    gated: bool = False  # an aLoRA row is among them: the context's gate says where their deltas apply

    SLOT_DTYPE = torch.long

    @staticmethod
    def entry(w: LoraWeights | None) -> list[int]:
        """A slot's row of the table: zeros (rank 0) where its adapter has no LoRA at the module."""
        return [0] * TABLE_COLUMNS if w is None else w.entry

    @property
    def slot_of_row(self) -> Tensor:
        return self.tables.slot_of_row  # [N]

    @cached_property
    def table(self) -> Tensor:
        return self.tables.table[self.index]  # [S, 6]

    @cached_property
    def scales(self) -> Tensor:
        return self.tables.scales[self.index]  # [S]

    @property
    def device(self) -> torch.device:
        return self.slot_of_row.device

    @property
    def per_row(self) -> list[LoraWeights | None]:
        return [None if k < 0 else self.weights[k] for k in self.slots]

    @cached_property
    def stacked(self) -> ModuleDelta:
        if not self.weights:
            raise ValueError("a CUDA graph's slot deltas keep no weights: they have no stacked form")
        return ModuleDelta.build(self.per_row, self.gated)

    @classmethod
    def build(cls, per_row: list[LoraWeights | None], gated: bool = False):
        """The delta of one module alone, each distinct weights of `per_row` a slot."""
        return cls.build_all(*_alone(per_row, gated))[""]

    @classmethod
    def build_all(cls, slots: list[int], by_slot: dict[str, list[LoraWeights | None]], gated: set[str]) -> dict:
        """One delta per module of `by_slot` (name -> each slot's weights there), over one SlotTables."""
        names = list(by_slot)
        first = next(w for w in by_slot[names[0]] if w is not None).A
        tables = SlotTables(
            torch.tensor(slots, dtype=cls.SLOT_DTYPE, device=first.device),  # [N]
            torch.tensor([[cls.entry(w) for w in by_slot[n]] for n in names], dtype=torch.long,
                         device=first.device),  # [M, S, 6]
            torch.tensor([[0.0 if w is None else w.scale for w in by_slot[n]] for n in names],
                         device=first.device))  # [M, S] float32
        return {n: cls(tuple(by_slot[n]), tuple(slots), tables, m, first.dtype,
                       any(w is not None and w.dora_scale is not None for w in by_slot[n]),
                       max(w.rank for w in by_slot[n] if w is not None), n in gated)
                for m, n in enumerate(names)}


@dataclass(frozen=True)
class SlotDelta(_SlotTable):
    """The per-row delta of one wrapped module by slot on the CPU (see the module docstring)."""

    @staticmethod
    def entry(w: LoraWeights | None) -> list[int]:
        return [0] * TABLE_COLUMNS if w is None else w.cpu_entry

    def apply(self, x: Tensor, out: Tensor, base_bias: Tensor | None, gate: Tensor | None = None) -> Tensor:
        """Add the delta to `out` = base_layer(x) in place and return it; `gate` [N, L, 1] bool: where
        each row's delta applies (None: everywhere)."""
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, in]
        if x3.shape[1] != 1 or x.dtype != self.dtype:
            return self.stacked.apply(x, out, base_bias, gate)
        slots = self.slot_of_row  # [N]
        if self.gated and gate is not None:  # aLoRA rows before their invocation: no slot this step
            slots = torch.where(gate.reshape(-1), slots, -1)
        bias = base_bias if self.dora and base_bias is not None else kernels.NONE  # [out] or none
        kernels.cpu().lora_delta(x3[:, 0].contiguous(), out.view(out.shape[0], -1), slots, self.table, self.scales,
                                 bias)  # x [N, in], out [N, out]
        return out


@dataclass(frozen=True)
class TritonDelta(_SlotTable):
    """The per-row delta of one wrapped module by slot on CUDA, any tokens per row (see the module
    docstring): the table on the device, read by server/kernels/lora_triton.py."""

    SLOT_DTYPE = torch.int32

    def apply(self, x: Tensor, out: Tensor, base_bias: Tensor | None, gate: Tensor | None = None) -> Tensor:
        """Add the delta to `out` = base_layer(x) in place and return it; `gate` [N, L, 1] bool: where
        each row's delta applies (None: everywhere)."""
        if x.dtype != self.dtype:
            return self.stacked.apply(x, out, base_bias, gate)
        from server.kernels.lora_triton import lora_delta  # triton is imported only where it serves
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, in]
        n, tokens = x3.shape[:2]
        slots = self.slot_of_row[:, None].expand(n, tokens)  # [N, L]: each token its row's slot
        if self.gated and gate is not None:  # aLoRA tokens before their invocation: no slot
            slots = torch.where(gate.reshape(n, tokens), slots, -1)
        lora_delta(x3.reshape(n * tokens, -1), out.view(n * tokens, -1), slots.reshape(-1).contiguous(), self.table,
                   self.scales, base_bias if self.dora else None, self.max_rank, tokens)  # x [T, in], out [T, out]
        return out


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def slot_deltas(slots: list[int], by_slot: dict[str, list[LoraWeights | None]],
                gated: set[str] = frozenset()) -> dict[str, SlotDelta | TritonDelta | ModuleDelta]:
    """Every module's delta over one batch: row i's adapter is slot slots[i] (-1: none), by_slot[name][k]
    slot k's weights at that module (None: no LoRA there), `gated` the modules an aLoRA row reaches.
    By slot on CUDA with Triton (once it has checked out on the device) and on the CPU when the
    kernels are built, the modules of one kernel and place sharing one SlotTables; else stacked."""
    groups: dict[tuple, list[str]] = {}  # (kind, place) -> modules
    for name, ws in by_slot.items():
        weights = [w for w in ws if w is not None]
        groups.setdefault((_kind(weights), weights[0].kernel_place), []).append(name)
    deltas: dict[str, SlotDelta | TritonDelta | ModuleDelta] = {}
    for (kind, _), names in groups.items():
        if kind is ModuleDelta:
            deltas |= {n: ModuleDelta.build([None if k < 0 else by_slot[n][k] for k in slots], n in gated) for n in names}
        else:
            deltas |= kind.build_all(slots, {n: by_slot[n] for n in names}, gated)
    return deltas


def _kind(weights: list[LoraWeights]) -> type[SlotDelta | TritonDelta | ModuleDelta]:
    places = {w.kernel_place for w in weights}
    if len(places) != 1 or None in places:  # one place, and every weights readable there
        return ModuleDelta
    first = weights[0].A
    if kernels.on_triton(first) and first.dtype in CHECK_TOLERANCE:  # float64 stays exact, stacked
        return TritonDelta if triton_serves(first.device, first.dtype) else ModuleDelta
    if first.is_cpu and kernels.cpu() is not None:
        return SlotDelta
    return ModuleDelta


def module_delta(per_row: list[LoraWeights | None], gated: bool = False) -> SlotDelta | TritonDelta | ModuleDelta:
    """The delta of one module over a batch (per_row[i]: row i's weights, None: no delta), as
    `slot_deltas` gives it, each distinct weights a slot."""
    return slot_deltas(*_alone(per_row, gated))[""]


def _alone(per_row: list[LoraWeights | None], gated: bool) -> tuple[list[int], dict, set[str]]:
    """One module's rows as `slot_deltas` takes a batch's, under the name "": each distinct weights a slot."""
    distinct, slots = assign_slots(per_row)
    return slots, {"": distinct}, {""} if gated else set()


@cache
def triton_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels compile and equal ModuleDelta on `device` in `dtype`, checked once
    on a small problem (decode and prefill; plain, shift and DoRA slots of ranks across a tile; with
    and without a base bias). Where not, one warning, and the stacked path serves from then on."""
    try:
        error = max(_triton_error(device, dtype, tokens, bias) for tokens in (1, 3) for bias in (True, False))
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure: the stacked path serves
        log.warning("Triton LoRA kernels unavailable on %s in %s (%r); LoRA deltas stack weights", device, dtype, exc)
        return False
    if error > CHECK_TOLERANCE[dtype]:
        log.warning("Triton LoRA kernels differ from the stacked path on %s in %s (relative error %.3g > %g); "
                    "LoRA deltas stack weights", device, dtype, error, CHECK_TOLERANCE[dtype])
        return False
    return True


CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # a rounding or two of `dtype`


def _triton_error(device: torch.device, dtype: torch.dtype, tokens: int, bias: bool) -> float:
    """max |TritonDelta − ModuleDelta| / (1 + |ModuleDelta|) on 4 rows, 40 -> 72, of ranks 4 and 20 (one
    plain, one with shift and DoRA, one base row); the reference in float64 from the same `dtype` values."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)
    plain = LoraWeights(rand(4, 40), rand(72, 4), 0.5)
    dora = LoraWeights(rand(20, 40), rand(72, 20) * 0.2, 0.25, dora_scale=rand(72).abs() + 0.5, shift=rand(72))
    per_row = [plain, None, dora, plain]
    x, base_out, base_bias = rand(4, tokens, 40), rand(4, tokens, 72), rand(72) if bias else None
    wide = [None if w is None else w.to(device, torch.float64) for w in per_row]
    want = ModuleDelta.build(wide).apply(x.double(), base_out.double(), None if base_bias is None else base_bias.double())
    got = TritonDelta.build(per_row).apply(x, base_out.clone(), base_bias)
    return ((got.double() - want).abs() / (1 + want.abs())).max().item()
