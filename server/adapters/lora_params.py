"""LoRA on parameters (PEFT's `target_parameters`): MoE routers and fused experts, unmerged and merged.

With PEFT 0.21.2 on transformers 5, "all-linear" on an MoE base (qwen3_moe, mixtral) is saved as
the attention projections in `target_modules` plus `target_parameters` ["gate.weight", "gate_up_proj",
"down_proj"]: the experts are 3-D Parameters and the router a custom module, no longer nn.Linear
(peft/utils/transformers_weight_conversion.py; gate_up_proj gets rank 2r and alpha 2·alpha by
rank/alpha_pattern, gate and up fused). PEFT wraps each targeted Parameter in a lora.ParamWrapper
(peft/tuners/lora/layer.py), which makes the parameter W + s·ΔW during the module's forward:

    2-D W [out, in] (router)   lora_A [r, in], lora_B [out, r]        ΔW = B A
    3-D W [E, out, in]         lora_A [r·E, in]: row e·r + k = A_e[k]   ΔW_e = B_e A_e
    (experts, not transposed)  lora_B [out, r·E]: column k·E + e = B_e[:, k]

Two Parameters of one module nest: the first in the module's own parameter order is wrapped first,
so it is the inner wrapper and its file keys carry one `.base_layer` per wrapper outside it
(`experts.base_layer.lora_A.weight` is gate_up_proj's, `experts.lora_A.weight` down_proj's). A
parameter key matches an entry when equal or ending in "." + entry (no regex; exclude_modules and
layers_to_transform do not apply); rank/alpha patterns are matched against that key.

Served unmerged, per row: the router's per-row delta is a Linear's (lora_delta.py), added to the one
F.linear that applies its weight, while the router's own code runs (`LoraRouter`). The experts run
here (`LoraExperts`): pairs (token, chosen expert) sorted by expert as transformers' grouped_mm
forward, base projections by grouped matmul, and each adapter of the batch adds s·B_e(A_e x) to its
rows' pairs by two grouped matmuls of rank r; a row's token t of N·L flattened tokens belongs to row
t // L. The adapters' weights are read in place (no per-plan copies: an expert LoRA is ~E times a
module's). µs per delta, grouped / gathered (A_e, B_e indexed per pair, two bmm), fp32, 2 threads:

    E, in -> out, r           S = 8 pairs    64            512
    4, 64 -> 64, 8               49 / 30      57 / 90       106 / 591
    128, 2048 -> 1536, 32       289 / 712   1542 / 5663    5989 / 111422
    128, 768 -> 2048, 16        487 / 320    987 / 2815    3539 / 58919

Grouped throughout: gathered wins only at a few pairs on some shapes and copies S·r·(in+out)
elements (470M for a 4096-pair prefill at the middle shape).
Merged: W_e += s·B_e A_e, expert by expert, each original saved first (lora_layer's transaction).
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from transformers.integrations.moe import _grouped_linear, _grouped_mm
from transformers.pytorch_utils import Conv1D

from server.adapters.patterns import listed
from server.errors import AdapterFormatError

if TYPE_CHECKING:
    from server.adapters.lora_delta import ModuleDelta, SlotDelta, TritonDelta
    from server.adapters.lora_layer import LoraContext
    from server.engine.clock import AdapterClock

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # the fused experts' Parameters served
WRAPPER_PATH = ".base_layer"  # what PEFT's file keys repeat once per ParamWrapper outside a parameter's own


def measured(clock: AdapterClock | None):
    """The clock's `lora` region on measured decode steps, else nothing."""
    return nullcontext() if clock is None else clock.measure("lora")


# ---------------------------------------------------------------- which parameters


def is_experts(module: nn.Module) -> bool:
    """transformers' fused experts (@use_experts_implementation) in the layout served here: gated,
    gate_up_proj [E, 2I, H] and down_proj [E, H, I], no biases, no post-expert norm, no expert parallelism."""
    unserved = ("has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")
    return (hasattr(module, "_apply_gate") and getattr(module, "has_gate", False)
            and not any(getattr(module, flag, True) for flag in unserved))


def is_router(module: nn.Module) -> bool:
    """An MoE router: a leaf module whose only Parameter is a 2-D `weight` (transformers' *TopKRouter).
    That its forward applies it once as F.linear(x, weight) is checked at each LoraRouter forward."""
    params = dict(module.named_parameters(recurse=False))
    return (not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) and not any(module.children())
            and list(params) == ["weight"] and params["weight"].dim() == 2)


@dataclass(frozen=True)
class ParamTarget:
    """One Parameter selected by target_parameters."""

    module: str  # the module holding it, e.g. model.layers.0.mlp.experts
    param: str  # "weight" (router), "gate_up_proj" or "down_proj"
    path: str  # its ParamWrapper's module name in PEFT's file keys (module + ".base_layer" per outer wrapper)

    @property
    def key(self) -> str:
        """The parameter's name, as PEFT matches target_parameters and rank/alpha patterns against it."""
        return f"{self.module}.{self.param}"


def param_targets(entries: tuple[str, ...], layers: Iterable[tuple[str, nn.Module]],
                  modules: set[str]) -> list[ParamTarget]:
    """PEFT's _inject_parameters over `layers` (named_layers of the base model, wrappers seen through).

    `modules`: the modules target_modules selected (PEFT refuses a parameter of one of them)."""
    names = frozenset(entries)
    targets: list[ParamTarget] = []
    for name, module in layers:
        params = [p for p, _ in module.named_parameters(recurse=False) if listed(f"{name}.{p}", names)]
        for depth, param in enumerate(params):
            _check_target(name, module, param, modules)
            targets.append(ParamTarget(name, param, name + WRAPPER_PATH * (len(params) - 1 - depth)))
    unmatched = [e for e in entries if not any(listed(t.key, frozenset([e])) for t in targets)]
    if unmatched:
        raise AdapterFormatError("target_parameters", "entries that each name a parameter of the base model "
                                 "(its name or a '.'-suffix of it, as PEFT matches)", unmatched)
    return targets


def _check_target(name: str, module: nn.Module, param: str, modules: set[str]) -> None:
    if name in modules:
        raise AdapterFormatError("target_parameters", "parameters of modules not also selected by target_modules "
                                 "(PEFT refuses to wrap both)", f"{name}.{param}")
    if (param == "weight" and is_router(module)) or (param in EXPERT_PARAMS and is_experts(module)):
        return
    shape = tuple(getattr(module, param).shape)
    raise AdapterFormatError("target_parameters", "an MoE router's weight or fused experts' gate_up_proj or "
                             "down_proj (target nn.Linear modules with target_modules)",
                             f"{name}.{param} ({type(module).__name__}, shape {shape})")


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class ExpertLora:
    """One fused expert Parameter's LoRA (in, out: its input and output sizes), laid out for grouped matmuls.

    Grouped matmuls need 16-byte strides, so the rank is zero-padded to R, a multiple of 16 bytes (fp32:
    4, bf16: 8); the padding adds exact zeros."""

    A: Tensor  # [E, in, R]: A_eᵀ per expert, contiguous, columns r.. zero
    B: Tensor  # [E, R, out]: B_eᵀ per expert, contiguous, rows r.. zero
    scale: float  # s = alpha / r (rsLoRA: alpha / sqrt(r)), r and alpha from the patterns for the parameter
    rank: int  # r

    @staticmethod
    def from_peft(lora_a: Tensor, lora_b: Tensor, n_experts: int, scale: float) -> ExpertLora:
        """lora_a [r·E, in] (row e·r + k), lora_b [out, r·E] (column k·E + e), as ParamWrapper saves them."""
        n_out, n_in = lora_b.shape[0], lora_a.shape[1]
        a = lora_a.view(n_experts, -1, n_in).transpose(1, 2)  # [E, r, in] -> [E, in, r]
        b = lora_b.view(n_out, -1, n_experts).permute(2, 1, 0)  # [out, r, E] -> [E, r, out]
        return ExpertLora.aligned(a, b, scale)

    @staticmethod
    def aligned(a: Tensor, b: Tensor, scale: float) -> ExpertLora:
        """a [E, in, r], b [E, r, out] -> their rank zero-padded to 16 bytes."""
        rank = a.shape[2]
        pad = -rank % max(1, 16 // a.element_size())
        return ExpertLora(F.pad(a, (0, pad)).contiguous(), F.pad(b, (0, 0, 0, pad)).contiguous(), scale, rank)

    def tensors(self) -> list[Tensor]:
        return [self.A, self.B]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExpertLora:
        a, b = self.A[:, :, : self.rank], self.B[:, : self.rank]
        return ExpertLora.aligned(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), self.scale)


ExpertsLora = dict[str, ExpertLora]  # one adapter's LoRA on one experts module: parameter name -> weights


# ---------------------------------------------------------------- unmerged


@dataclass(frozen=True)
class ExpertsDelta:
    """The per-row LoRA of one experts module for one batch composition."""

    adapters: tuple[ExpertsLora, ...]  # the distinct adapters of the rows with a delta here
    slots: Tensor | None  # [N] long: each row's index into `adapters`, -1 for none; None: every row adapters[0]

    @staticmethod
    def build(per_row: list[ExpertsLora | None]) -> ExpertsDelta:
        """per_row[i]: row i's LoRA on this experts module, None where it has none."""
        adapters: list[ExpertsLora] = []
        for lora in per_row:
            if lora is not None and not any(lora is a for a in adapters):
                adapters.append(lora)
        if len(adapters) == 1 and all(lora is not None for lora in per_row):
            return ExpertsDelta((adapters[0],), None)
        slots = [-1 if lora is None else next(i for i, a in enumerate(adapters) if a is lora) for lora in per_row]
        device = next(iter(adapters[0].values())).A.device
        return ExpertsDelta(tuple(adapters), torch.tensor(slots, device=device))

    def forward(self, experts: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                clock: AdapterClock | None) -> Tensor:
        """hidden [T, H] (T = N·L tokens, row by row), top_k_index / top_k_weights [T, K] -> [T, H]."""
        k = top_k_index.shape[1]
        expert_ids, order = torch.sort(top_k_index.reshape(-1))  # [S = T·K]: the pairs grouped by expert
        tokens = order // k  # [S]
        offsets = _offsets(expert_ids, experts.num_experts)
        groups = self._groups(expert_ids, tokens, hidden.shape[0], offsets, experts.num_experts)
        up = self._project(experts, "gate_up_proj", hidden[tokens], offsets, groups, clock)  # [S, 2I]
        out = self._project(experts, "down_proj", experts._apply_gate(up), offsets, groups, clock)  # [S, H]
        out = out * top_k_weights.reshape(-1)[order, None]
        by_token = torch.empty_like(out)
        by_token[order] = out  # back to (token, k) order, summed over k as transformers' grouped_mm forward
        return by_token.view(-1, k, out.shape[-1]).sum(dim=1).to(hidden.dtype)

    def _groups(self, expert_ids: Tensor, tokens: Tensor, n_tokens: int, offsets: Tensor,
                n_experts: int) -> list[tuple[Tensor | None, Tensor]]:
        """Per adapter: its pairs (positions in expert order; None: all) and their grouped-matmul offsets."""
        if self.slots is None:
            return [(None, offsets)]
        slot = self.slots[tokens // (n_tokens // self.slots.shape[0])]  # [S]: each pair's row's adapter, -1: none
        groups = []
        for i in range(len(self.adapters)):
            at = (slot == i).nonzero().squeeze(1)  # [S_i], still grouped by expert
            groups.append((at, _offsets(expert_ids[at], n_experts)))
        return groups

    def _project(self, experts: nn.Module, name: str, x: Tensor, offsets: Tensor,
                 groups: list[tuple[Tensor | None, Tensor]], clock: AdapterClock | None) -> Tensor:
        """x [S, in] (pairs by expert) through each pair's expert's `name` [E, out, in], plus the LoRA deltas."""
        out = _grouped_linear(x, getattr(experts, name), offsets)  # [S, out]
        with measured(clock):
            for adapter, (at, offs) in zip(self.adapters, groups):
                lora = adapter.get(name)
                if lora is None:
                    continue
                xs = x if at is None else x[at]  # [S_i, in]
                delta = _grouped_mm(_grouped_mm(xs, lora.A, offs) * lora.scale, lora.B, offs)  # [S_i, r] -> [S_i, out]
                if at is None:
                    out.add_(delta)
                else:
                    out.index_add_(0, at, delta)
        return out


def _offsets(expert_ids: Tensor, n_experts: int) -> Tensor:
    """expert_ids [S] sorted -> [E] int32: the end of each expert's pairs (grouped matmul offsets)."""
    return torch.bincount(expert_ids, minlength=n_experts).cumsum(0).to(torch.int32)


class LoraWrapper(nn.Module):
    """A base model module kept as `base_layer` (same Parameters, nothing copied) plus the per-row LoRA
    its `module_name` gets in the plan of `ctx`."""

    def __init__(self, base_layer: nn.Module, module_name: str, ctx: LoraContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.ctx = ctx


class LoraExperts(LoraWrapper):
    """transformers' fused experts plus the per-row LoRA of their Parameters in the current plan."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        plan = self.ctx.plan
        delta = None if plan is None else plan.experts.get(self.module_name)
        if delta is None:  # the model's own experts implementation
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return delta.forward(self.base_layer, hidden_states, top_k_index, top_k_weights, self.ctx.clock)


class LoraRouter(LoraWrapper):
    """An MoE router plus the per-row LoRA of its weight: logits x Wᵀ + s·B(A x), the router's code unchanged."""

    def forward(self, hidden_states: Tensor):
        plan = self.ctx.plan
        delta = None if plan is None else plan.modules.get(self.module_name)
        if delta is None:
            return self.base_layer(hidden_states)
        with _LogitsDelta(self.base_layer.weight, delta, plan.rows, self.ctx.clock) as added:
            out = self.base_layer(hidden_states)
        if added.count != 1:
            raise TypeError(f"{self.module_name}: expected a router that applies its weight once as "
                            f"F.linear(x, weight), got {added.count} such calls")
        return out


class _LogitsDelta(TorchFunctionMode):
    """Adds a router's per-row delta to the output of the F.linear that applies its weight."""

    def __init__(self, weight: Tensor, delta: SlotDelta | TritonDelta | ModuleDelta, rows: int,
                 clock: AdapterClock | None) -> None:
        super().__init__()
        self.weight, self.delta, self.rows, self.clock = weight, delta, rows, clock
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.count += 1
            x = args[0]  # [N·L, H]: the MoE block flattens its rows
            with measured(self.clock):
                self.delta.apply(x.reshape(self.rows, -1, x.shape[-1]), out.view(self.rows, -1, out.shape[-1]), None)
        return out


# ---------------------------------------------------------------- merged


def merge_experts(experts: nn.Module, lora: ExpertsLora, saved: dict[str, Tensor]) -> None:
    """W_e += s·B_e A_e for each targeted Parameter (under inference_mode), each original saved in `saved` first."""
    for name, w in lora.items():
        param = getattr(experts, name)  # [E, out, in]
        saved[name] = param.detach().clone()
        for e in range(param.shape[0]):  # one expert at a time: an [out, in] transient, not [E, out, in]
            a, b = w.A[e].to(param.device, torch.float32), w.B[e].to(param.device, torch.float32)  # [in, r], [r, out]
            param[e].copy_((param[e].float() + (a @ b).T * w.scale).to(param.dtype))
