"""The LoRA layer: the unmerged wrappers, the context the engine drives, the per-batch plan, merge.

Every targeted nn.Linear / transformers Conv1D of the base model is replaced, once, by a
`LoraLinear` that keeps it as `base_layer` (same Parameters, nothing copied) and adds the
delta of each row's adapter to `base_layer(x)`:

    plain LoRA  delta = s·B(A x) + s·b_B                      (b_B: lora_B bias, lora_bias=True)
    DoRA        delta = (g − 1)·(x Wᵀ) + g·s·B(A x)           (g = m / ‖W + s·BA‖ per output)
    either      delta += b' − b                              (b': base bias replaced by the file)

Parameters targeted by `target_parameters` (MoE routers and fused experts) get the wrappers of
lora_params.py: a router's delta is a ModuleDelta like a Linear's, the experts' an ExpertsDelta.

One `LoraContext` is shared by all wrappers of a model; the engine sets `ctx.plan` before each
forward, and `ctx.gate` when an aLoRA row is in it (alora.py: its delta is zero before its
invocation). `ctx.plan = None` (no unmerged LoRA row in the batch) costs one attribute check.

Strategy: gather-batched (BGMV style). At plan build, for each module, the A/B of every row
with a delta there are stacked (s folded into B) and zero-padded to the batch's largest rank;
a forward is then one `index_select` (none when every row has a delta), two `torch.bmm` and one
in-place add, whatever the number of distinct adapters. When every such row has the same
adapter, its A and s·B are used as they are: two matmuls folded over all tokens, no copies.
`python -m load_tests.lora_kernels` (bench shapes: q/o 768->768, k/v 768->256, 8 rows, r=16),
µs added per layer of 4 modules, fp32, 2 threads of a quiet Xeon:

    composition (8 rows)         decode L=1: grouped / this   prefill L=32: grouped / this
    1 adapter on all rows                     88 / 56                     538 / 473
    2 / 4 / 8 adapters              251 / 94, 442 / 103, 814 / 97    968 / 371, 1266 / 361, 1838 / 435
    3 adapters r8/16/32 + 2 base             345 / 198                    890 / 642
    (base q/k/v/o alone                         286                          2883)

Grouping by adapter (index, two matmuls, index_add per adapter) grows with the number of
adapters; this does not (on an H200 in bf16, launch-bound: 224-1710 µs vs 142-191 µs). Plan
build: 30 µs per layer for one adapter, 330-790 µs when rows differ (cached per composition by
the engine); a plan holds M·(in+out)·R elements per module when rows differ.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from server.adapters.lora_params import (
    ExpertsDelta,
    LoraExperts,
    LoraRouter,
    LoraWrapper,
    is_experts,
    is_router,
    measured,
    merge_experts,
)
from server.errors import AdapterFormatError, MergeConflictError

if TYPE_CHECKING:
    from server.adapters.lora import LoraAdapter
    from server.engine.clock import AdapterClock

LINEAR_TYPES = (nn.Linear, Conv1D)
ONE_THREAD_MAX_TOKENS = 64  # CPU deltas over at most this many tokens run on one thread (see apply)
ONE_THREAD_MAX_WEIGHTS = 512 * 1024  # ... and over at most this many A+B elements (2 MiB in fp32)


@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA, ready to serve. Shapes use the nn.Linear convention even for Conv1D."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float  # s = alpha / r (rsLoRA: alpha / sqrt(r))
    dora_scale: Tensor | None = None  # [out] DoRA g = magnitude / ‖W + s·BA‖ of the pristine base
    lora_bias: Tensor | None = None  # [out] bias of lora_B (merged as s·b_B)
    base_bias: Tensor | None = None  # [out] b': replaces the base layer's bias
    shift: Tensor | None = None  # [out] s·b_B + (b' − b): what an unmerged row adds besides B(A x)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def tensors(self) -> list[Tensor]:
        return [t for f in fields(self) if isinstance(t := getattr(self, f.name), Tensor)]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraWeights:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, Tensor):
                moved[key] = value.to(device=device, dtype=dtype)
        return LoraWeights(**moved)


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
        each row's delta applies (None: everywhere).

        Few tokens and small weights on the CPU (decode of a few adapters): one thread. At these
        sizes OpenMP's fan-out costs more than the products; measured in the engine thread on the
        75M bench model, 8 rows of 8 adapters: LoRA time per decode step 11 ms with 2 threads, 6 ms
        with 1; 8 rows of 8 two-LoRA combinations (rank 32: 393k elements at q and o), 6.9-7.1 ms with
        2 and 4.6-5.1 ms with 1. With many distinct adapters the stacked weights no longer sit in cache
        and streaming them from memory is what costs: 32 rows of 32 adapters, 12-15 ms per step on one
        thread (BENCHMARKS.md); both threads then.
        """
        small = self.A.numel() + self.B.numel() <= ONE_THREAD_MAX_WEIGHTS
        gate = gate if self.gated else None
        if not (x.is_cpu and small and x.numel() // x.shape[-1] <= ONE_THREAD_MAX_TOKENS):
            return self._apply(x, out, base_bias, gate)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._apply(x, out, base_bias, gate)
        finally:
            torch.set_num_threads(threads)

    def _apply(self, x: Tensor, out: Tensor, base_bias: Tensor | None, gate: Tensor | None) -> Tensor:
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
class LoraPlan:
    """What every wrapper needs for one batch composition; build once per composition, reuse per step."""

    rows: int  # N, the batch's rows (an MoE block's router and experts see them as N·L tokens)
    modules: dict[str, ModuleDelta]  # module name -> delta (Linear, Conv1D, MoE router); untargeted: absent
    experts: dict[str, ExpertsDelta]  # experts module name -> delta of its Parameters; untargeted: absent

    @staticmethod
    def build(rows: list[LoraAdapter | None]) -> LoraPlan | None:
        """rows[i]: the unmerged LoRA of batch row i (None: no LoRA). None if no row has one."""
        names = sorted({name for adapter in rows if adapter is not None for name in adapter.modules})
        experts = sorted({name for adapter in rows if adapter is not None for name in adapter.experts})
        if not names and not experts:
            return None
        return LoraPlan(len(rows), {
            name: ModuleDelta.build([None if a is None else a.modules.get(name) for a in rows],
                                    any(a.spec.alora_invocation_tokens for a in rows if a and name in a.modules))
            for name in names
        }, {
            name: ExpertsDelta.build([None if a is None else a.experts.get(name) for a in rows]) for name in experts
        })


class LoraContext:
    """Shared by every LoRA wrapper of one model. The engine sets `plan` before each forward."""

    def __init__(self) -> None:
        self.plan: LoraPlan | None = None
        self.gate: Tensor | None = None  # [N, L, 1] bool, with aLoRA rows: where each row's LoRA applies
        self.clock: AdapterClock | None = None  # set on measured decode steps only


class LoraLinear(LoraWrapper):
    """An nn.Linear or Conv1D plus the per-row LoRA delta of the current plan."""

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # x: [N, L, in] -> out: [N, L, out]
        plan = self.ctx.plan
        if plan is None:
            return out
        delta = plan.modules.get(self.module_name)
        if delta is None:
            return out
        with measured(self.ctx.clock):
            return delta.apply(x, out, self.base_layer.bias, self.ctx.gate)


def ensure_wrapped(model: nn.Module, module_names, ctx: LoraContext) -> None:
    """Replace each named Linear/Conv1D, MoE router or fused experts of `model` by its LoRA wrapper, once."""
    for name in module_names:
        module = model.get_submodule(name)
        if isinstance(module, LoraWrapper):
            if module.ctx is not ctx:
                raise ValueError(f"{name} is wrapped with another LoraContext")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _wrapper_of(name, module)(module, name, ctx))


def _wrapper_of(name: str, module: nn.Module) -> type[nn.Module]:
    if isinstance(module, LINEAR_TYPES):
        return LoraLinear
    if is_experts(module):
        return LoraExperts
    if is_router(module):
        return LoraRouter
    raise TypeError(f"{name}: expected nn.Linear, Conv1D, an MoE router or fused experts, got {type(module).__name__}")


def base_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` in the model, seen through its LoRA wrapper if any."""
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, LoraWrapper) else module


def named_layers(model: nn.Module):
    """(name, module) of every submodule as the unwrapped model names them (wrappers see-through)."""
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraWrapper)}
    for name, module in model.named_modules():
        if name and id(module) not in wrapped:
            yield name, module.base_layer if isinstance(module, LoraWrapper) else module


# ---------------------------------------------------------------- merge / restore


_MERGED: weakref.WeakKeyDictionary[nn.Module, MergedState] = weakref.WeakKeyDictionary()


@dataclass
class MergedState:
    """An adapter folded into the base weights; `restore()` copies the pristine tensors back."""

    model: nn.Module
    adapter: LoraAdapter
    pristine: dict[str, dict[str, Tensor]]  # module name -> {"weight"/"bias"/expert Parameter: untouched copy}

    def restore(self) -> None:
        if _MERGED.get(self.model) is not self:
            raise MergeConflictError("restore: expected the model's current merge, got one already restored")
        with torch.inference_mode():
            _copy_back(self.model, self.pristine)
        del _MERGED[self.model]


def merge(model: nn.Module, adapter: LoraAdapter) -> MergedState:
    """Fold W + s·BA (DoRA: g·(W + s·BA); biases; experts W_e + s·B_e A_e) into the targeted weights, in place.

    A transaction: whatever raises part-way (out of memory, say), every tensor already changed is
    copied back from its saved original before the exception goes on, so the base stays bit-exact."""
    current = _MERGED.get(model)
    if current is not None:
        raise MergeConflictError(f"merge: expected no adapter merged into this model, got one merged "
                                 f"({len(current.pristine)} modules); restore it first")
    check_mergeable(model, adapter)
    state = MergedState(model, adapter, {})
    with torch.inference_mode():
        try:
            for name, weights in adapter.modules.items():
                _merge_module(base_layer(model, name), weights, state.pristine.setdefault(name, {}))
            for name, lora in adapter.experts.items():
                merge_experts(base_layer(model, name), lora, state.pristine.setdefault(name, {}))
        except BaseException:
            _copy_back(model, state.pristine)
            raise
    _MERGED[model] = state
    return state


def _copy_back(model: nn.Module, saved: dict[str, dict[str, Tensor]]) -> None:
    """Copy saved originals back into the base layers (under inference_mode)."""
    for name, tensors in saved.items():
        layer = base_layer(model, name)
        for attr, tensor in tensors.items():
            getattr(layer, attr).copy_(tensor)


def check_mergeable(model: nn.Module, adapter: LoraAdapter) -> None:
    """Refuse, before touching anything, what PEFT cannot merge or what merging would spill over."""
    tied = _tied_parameters(model)
    for name, weights in adapter.modules.items():
        layer = base_layer(model, name)
        if weights.lora_bias is not None and layer.bias is None:
            raise AdapterFormatError("lora_bias", f"a base bias to merge into ({name} has none)", True)
        if id(layer.weight) in tied:
            raise AdapterFormatError(name, "an untied weight to merge into", "a weight shared with another module")


def _tied_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _merge_module(layer: nn.Module, w: LoraWeights, saved: dict[str, Tensor]) -> None:
    """Merge one module (under inference_mode), each original saved in `saved` before it is changed."""
    weight = layer.weight  # Linear: [out, in]; Conv1D: [in, out]
    dev = weight.device
    delta = (w.B.to(dev, torch.float32) @ w.A.to(dev, torch.float32)) * w.scale  # [out, in]
    conv = isinstance(layer, Conv1D)
    merged = weight.float() + (delta.T if conv else delta)
    if w.dora_scale is not None:
        g = w.dora_scale.to(dev, torch.float32)  # [out]
        merged = merged * (g[None, :] if conv else g[:, None])
    saved["weight"] = weight.detach().clone()
    weight.copy_(merged.to(weight.dtype))
    if w.base_bias is not None or w.lora_bias is not None:
        bias = layer.bias.float() if w.base_bias is None else w.base_bias.to(dev, torch.float32)  # [out]
        if w.lora_bias is not None:
            bias = bias + w.lora_bias.to(dev, torch.float32) * w.scale
        saved["bias"] = layer.bias.detach().clone()
        layer.bias.copy_(bias.to(layer.bias.dtype))


def pristine(model: nn.Module, name: str, attr: str) -> Tensor:
    """A base tensor as it is with no adapter merged."""
    state = _MERGED.get(model)
    saved = state.pristine.get(name, {}) if state is not None else {}
    return saved.get(attr, getattr(base_layer(model, name), attr)).detach()


def dora_norm(model: nn.Module, name: str, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """DoRA's ‖W + s·BA‖ per output row, on the pristine base weight. [out]"""
    w = pristine(model, name, "weight").float()
    w = w.T if isinstance(base_layer(model, name), Conv1D) else w  # [out, in]
    return torch.linalg.norm(w + scale * (b.to(w.device) @ a.to(w.device)), dim=1).cpu()


def bias_shift(model: nn.Module, name: str, scale: float, lora_bias: Tensor | None,
               base_bias: Tensor | None) -> Tensor | None:
    """s·b_B + (b' − b): the bias part of an unmerged row's delta. [out]"""
    shift = None if lora_bias is None else scale * lora_bias
    if base_bias is not None:
        moved = base_bias - pristine(model, name, "bias").float().cpu()
        shift = moved if shift is None else shift + moved
    return shift
