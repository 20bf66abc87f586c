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

Each module's per-row delta (lora_delta.py): a slot table read by a kernel (each row from its own
adapter's weights, nothing stacked): C++ on the CPU at decode, Triton on CUDA; elsewhere the rows'
A/B stacked per composition for `torch.bmm`. The engine caches the plan per batch composition.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from server.adapters.lora_delta import LoraWeights, ModuleDelta, SlotDelta, TritonDelta, slot_deltas
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
from server.adapters.slots import assign_slots
from server.errors import AdapterFormatError, MergeConflictError

if TYPE_CHECKING:
    from server.adapters.lora import LoraAdapter
    from server.engine.clock import AdapterClock

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class LoraPlan:
    """What every wrapper needs for one batch composition; build once per composition, reuse per step."""

    rows: int  # N, the batch's rows (an MoE block's router and experts see them as N·L tokens)
    # module name -> delta (Linear, Conv1D, MoE router); untargeted: absent
    modules: dict[str, SlotDelta | TritonDelta | ModuleDelta]
    experts: dict[str, ExpertsDelta]  # experts module name -> delta of its Parameters; untargeted: absent

    @staticmethod
    def build(rows: list[LoraAdapter | None]) -> LoraPlan | None:
        """rows[i]: the unmerged LoRA of batch row i (None: no LoRA). None if no row has one."""
        distinct, slots = assign_slots(rows)
        names = sorted({name for adapter in distinct for name in adapter.modules})
        experts = sorted({name for adapter in distinct for name in adapter.experts})
        if not names and not experts:
            return None
        gated = {name for a in distinct if a.spec.alora_invocation_tokens for name in a.modules}
        return LoraPlan(len(rows), slot_deltas(slots, {name: [a.modules.get(name) for a in distinct] for name in names},
                                               gated), {
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
