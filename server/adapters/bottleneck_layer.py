"""Bottleneck adapters over a batch: the decoder's `ResidualHooks` for one batch composition.

At each site (position, layer) the rows of the batch are computed one of three ways:

    SiteSlots  CPU, one token per row (decode): a slot table. Each distinct adapter at the site is a
               slot (the addresses of its down and up weights and biases, and its form's flags:
               serial or parallel, norms, residuals; nothing copied) and
               server/kernels/bottleneck_site.cpp runs every row, base rows too, in two calls: the
               row's input and down projection, then (after the activations, torch ops over all
               rows) its up projection, scaling and residuals, each row with its own adapter's
               weights (BGMV) and its form. A row's result is the same whatever else is in the batch.
    forms      CUDA with Triton, any tokens per row: the rows split by *form* (the options that decide
               the computation besides the weights), each form's down and up projections by slot
               (server/kernels/bottleneck_triton.py: each token its own adapter's weights where they
               lie), its norms, activation, scaling and residuals as torch ops over the form's rows
               with each row's parameters. Taken once the kernel has matched F.linear on the device.
    groups     anywhere else (CPU prefill, no compiler or no Triton): one group per adapter, its rows
               gathered, its GEMMs, the result put back (`BottleneckAdapter.residual`).

Base rows get exactly `x + h`. Measured on 8 decode rows of the 75M bench model, in BENCHMARKS.md:
per step, 8 distinct adapters cost 4.7 ms by groups (12 output sites); by slot, all 24 sites of
`bn-0..7` cost 1.5 ms.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from server import kernels
from server.adapters.bottleneck import LN_EPS, BottleneckAdapter, BottleneckSpec, Site, combine
from server.adapters.lora_delta import CHECK_TOLERANCE
from server.adapters.slots import assign_slots
from server.residual import PLAIN, ResidualHooks

log = logging.getLogger(__name__)

NORMS = ("norm_before", "norm_after")
FLAGS = {"is_parallel": 1, "original_ln_before": 2, "original_ln_after": 4, "residual_before_ln": 8,
         "adapter_residual_before_ln": 16, "ln_before": 32, "ln_after": 64}  # bottleneck_site.cpp's kParallel ...
FORM_FIELDS = ("non_linearity", *FLAGS)  # the options that decide what a row computes, besides its weights


@dataclass(frozen=True)
class _Rows:
    """Some rows of the batch: a slice when contiguous, else an index tensor."""

    span: slice | None
    index: Tensor | None  # [k] long

    @staticmethod
    def of(rows: list[int], device: torch.device) -> _Rows:
        if rows == list(range(rows[0], rows[-1] + 1)):
            return _Rows(slice(rows[0], rows[-1] + 1), None)
        return _Rows(None, torch.tensor(rows, dtype=torch.long, device=device))

    def take(self, t: Tensor) -> Tensor:
        return t[self.span] if self.span is not None else t.index_select(0, self.index)

    def put(self, out: Tensor, values: Tensor) -> None:
        if self.span is not None:
            out[self.span] = values
        else:
            out.index_copy_(0, self.index, values)


@dataclass(frozen=True)
class SiteSlots:
    """Every row at one site, by slot (see the module docstring)."""

    slot_of_row: Tensor  # [N] long: each row -> its adapter's slot, -1 where it has none here
    table: Tensor  # [S, 6] long per slot: down.weight, down.bias, up.weight (column-major), up.bias, b, flags
    width: int  # the largest b
    acts: tuple[tuple[Callable[[Tensor], Tensor], Tensor | None], ...]  # each activation, its rows (None: all)
    scale: Tensor  # [N, 1] or [N, H] float32: each row's scaling; empty where every row's is 1
    norms: dict[str, Tensor]  # "norm_before"/"norm_after" -> each row's weight and bias [N, 2, H]; empty: none
    keep: tuple[BottleneckAdapter, ...]  # the adapters whose tensors the table points at

    def residual(self, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [N, 1, H] -> what replaces x + h: [N, 1, H]; rows with no adapter here get x + h."""
        n, hidden = h.shape[0], h.shape[-1]
        h2, x2 = h.reshape(n, hidden).contiguous(), x.reshape(n, hidden).contiguous()  # [N, H]
        down = h2.new_zeros(n, self.width)  # [N, b]: past a row's own b, zeros that its up never reads
        kernels.cpu().bottleneck_in(h2, x2, down, self.slot_of_row, self.table, self.norms["norm_before"])
        out = torch.empty_like(h2)  # [N, H]
        kernels.cpu().bottleneck_out(h2, x2, self._activated(down), out, self.slot_of_row, self.table, self.scale,
                                     self.norms["norm_after"])
        return out[:, None]

    def _activated(self, down: Tensor) -> Tensor:
        """down: [N, b] -> each row's activation of it, [N, b] contiguous."""
        if len(self.acts) == 1:
            return self.acts[0][0](down).contiguous()
        out = down.clone()
        for act, rows in self.acts:
            out.index_copy_(0, rows, act(down.index_select(0, rows)))
        return out

    @staticmethod
    def usable(adapters: list[BottleneckAdapter], site: Site) -> bool:
        """The kernels built, and every tensor they read on the CPU, in one dtype: the weights as
        the CPU serves them (down row-major, up column-major), the vectors contiguous."""
        params = [a.sites[site] for a in adapters]
        tensors = [t for p in params for t in p.values()]
        layouts = all(p["down.weight"].is_contiguous() and p["up.weight"].mT.is_contiguous() for p in params)
        return kernels.cpu() is not None and layouts and all(
            t.is_cpu and t.dtype == tensors[0].dtype and (t.dim() == 2 or t.is_contiguous()) for t in tensors)

    @staticmethod
    def build(site: Site, rows: list[BottleneckAdapter | None]) -> SiteSlots:
        """rows: each batch row's adapter, None where it has none at this site."""
        distinct, slot_of_row = assign_slots(rows)
        table = [_entry(a, site) for a in distinct]
        like = distinct[0].sites[site]["down.weight"]
        acts: dict[str, list[int]] = {}
        for i, a in enumerate(rows):
            if a is not None:
                acts.setdefault(a.spec.non_linearity, []).append(i)
        by_act = {a.spec.non_linearity: a.act for a in distinct}
        return SiteSlots(torch.tensor(slot_of_row), torch.tensor(table, dtype=torch.long), max(e[4] for e in table),
                         tuple((by_act[name], None if len(acts) == 1 else torch.tensor(idx))
                               for name, idx in acts.items()),
                         _scales(site, rows, like), {name: _norms(site, rows, name, like) for name in NORMS},
                         tuple(distinct))


def _entry(adapter: BottleneckAdapter, site: Site) -> list[int]:
    p = adapter.sites[site]
    flags = sum(bit for name, bit in FLAGS.items() if getattr(adapter.spec, name))
    return [p["down.weight"].data_ptr(), p["down.bias"].data_ptr(), p["up.weight"].data_ptr(), p["up.bias"].data_ptr(),
            p["down.weight"].shape[0], flags]


def _scales(site: Site, rows: list[BottleneckAdapter | None], like: Tensor) -> Tensor:
    """Each row's scaling as [N, 1] (floats, [1] tensors) or [N, H] (a "channel" one), float32 (the
    product rounds once, as torch's with a Python float or a tensor of the dtype); empty if all 1."""
    scales = [1.0 if a is None else a.scaling(site) for a in rows]
    if all(isinstance(s, float) and s == 1.0 for s in scales):
        return like.new_empty(0)
    per_row = [s.float() if isinstance(s, Tensor) else torch.tensor([s], dtype=torch.float32, device=like.device)
               for s in scales]
    width = max(r.numel() for r in per_row)
    return torch.stack([r.expand(width) for r in per_row]).contiguous()  # [N, 1] or [N, H]


def _norms(site: Site, rows: list[BottleneckAdapter | None], name: str, like: Tensor) -> Tensor:
    """Each row's LayerNorm `name` as [N, 2, H] (weight, bias; zeros where a row has none); empty if no row has it."""
    params = [None if a is None else a.sites[site] for a in rows]
    if not any(p is not None and f"{name}.weight" in p for p in params):
        return like.new_empty(0)
    zeros = like.new_zeros(2, like.shape[1])
    return torch.stack([torch.stack([p[f"{name}.weight"], p[f"{name}.bias"]])
                        if p is not None and f"{name}.weight" in p else zeros for p in params])


@dataclass(frozen=True)
class FormSite:
    """One form's rows at one site on CUDA, any tokens per row (see the module docstring)."""

    spec: BottleneckSpec  # of the form (any of its adapters': they agree on every form field)
    act: Callable[[Tensor], Tensor]  # the form's activation
    slot_of_row: Tensor  # [M] int32: each of the form's rows -> its adapter's slot
    down: Tensor  # [S, 6] long per slot: addresses of down.weight [b, H] and down.bias, b, H, strides
    up: Tensor  # [S, 6] long per slot: addresses of up.weight [H, b] and up.bias, H, b, strides
    width: int  # the largest b
    scale: Tensor | None  # [M, 1, 1] or [M, 1, H] float32: each row's scaling; None where every row's is 1
    norms: dict[str, Tensor]  # "norm_before"/"norm_after" -> each row's weight and bias [M, 2, H] float32
    keep: tuple[BottleneckAdapter, ...]  # the adapters whose tensors the tables point at

    def residual(self, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [M, L, H] (the form's rows) -> [M, L, H]."""
        return combine(self.spec, h, x, self._bottleneck, self._norm)

    def _bottleneck(self, v: Tensor) -> Tensor:
        """v: [M, L, H] -> s * up(act(down(LN_before(v)))): [M, L, H]."""
        from server.kernels.bottleneck_triton import slot_linear  # triton is imported only where it serves
        if self.spec.ln_before:
            v = self._norm("norm_before", v)
        rows, tokens, hidden = v.shape
        slots = self.slot_of_row.repeat_interleave(tokens)  # [M * L]: each token its row's slot
        down = v.new_zeros(rows * tokens, self.width)  # [M * L, b]: past a row's own b, zeros its up never reads
        slot_linear(v.reshape(rows * tokens, hidden).contiguous(), down, slots, self.down, tokens)
        up = v.new_empty(rows * tokens, hidden)  # [M * L, H]
        slot_linear(self.act(down).contiguous(), up, slots, self.up, tokens)
        up = up.view(rows, tokens, hidden)
        return up if self.scale is None else (up.float() * self.scale).to(up.dtype)  # rounded once, as torch

    def _norm(self, name: str, v: Tensor) -> Tensor:
        """v: [M, L, H] -> each row's LayerNorm `name` of it, in float32 rounded once (as F.layer_norm)."""
        params = self.norms[name]  # [M, 2, H] float32
        normed = F.layer_norm(v.float(), v.shape[-1:], eps=LN_EPS)  # [M, L, H] float32
        return torch.addcmul(params[:, 1:2], normed, params[:, 0:1]).to(v.dtype)

    @staticmethod
    def usable(adapters: list[BottleneckAdapter], site: Site) -> bool:
        """On CUDA with Triton, once the kernel checks out there; every tensor in one dtype, the
        vectors contiguous (a weight may have any strides)."""
        tensors = [t for a in adapters for t in a.sites[site].values()]
        first = tensors[0]
        return (kernels.on_triton(first) and first.dtype in CHECK_TOLERANCE
                and all((t.dim() == 2 or t.is_contiguous()) and t.dtype == first.dtype and t.device == first.device
                        for t in tensors)
                and triton_serves(first.device, first.dtype))

    @staticmethod
    def build(site: Site, per_row: list[BottleneckAdapter]) -> FormSite:
        """per_row: the adapter of each of the form's rows at this site."""
        distinct, slot_of_row = assign_slots(per_row)
        like = distinct[0].sites[site]["down.weight"]
        tables = [torch.tensor([_linear_entry(a.sites[site][f"{name}.weight"], a.sites[site][f"{name}.bias"])
                                for a in distinct], dtype=torch.long, device=like.device) for name in ("down", "up")]
        scale = _scales(site, per_row, like)
        return FormSite(distinct[0].spec, distinct[0].act,
                        torch.tensor(slot_of_row, dtype=torch.int32, device=like.device),
                        *tables, max(a.sites[site]["down.weight"].shape[0] for a in distinct),
                        scale[:, None] if scale.numel() else None,
                        {name: n.float() for name in NORMS if (n := _norms(site, per_row, name, like)).numel()},
                        tuple(distinct))


def _linear_entry(weight: Tensor, bias: Tensor) -> list[int]:
    """A slot's entry for bottleneck_triton.slot_linear: the addresses of a weight and its bias, the
    weight's shape and strides."""
    return [weight.data_ptr(), bias.data_ptr(), *weight.shape, *weight.stride()]


@cache
def triton_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton projection kernel compiles and equals F.linear on `device` in `dtype`, checked
    once (decode and prefill tilings). Where not, one warning, and bottleneck rows run by groups."""
    try:
        error = max(_triton_error(device, dtype, tokens) for tokens in (1, 3))
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure: the groups serve
        log.warning("Triton bottleneck kernel unavailable on %s in %s (%r); bottleneck rows run by groups",
                    device, dtype, exc)
        return False
    if not error <= CHECK_TOLERANCE[dtype]:
        log.warning("Triton bottleneck kernel differs from F.linear on %s in %s (relative error %.3g > %g); "
                    "bottleneck rows run by groups", device, dtype, error, CHECK_TOLERANCE[dtype])
        return False
    return True


def _triton_error(device: torch.device, dtype: torch.dtype, tokens: int) -> float:
    """max |slot_linear − F.linear| / (1 + |F.linear|) over 3 rows (slots of 24 and 40 outputs of 70
    inputs, one weight row-major, one column-major, a row with none: it must stay as it was); the
    reference in float64 from the same values."""
    from server.kernels.bottleneck_triton import slot_linear
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)
    weights = [(rand(24, 70), rand(24)), (rand(70, 40).T, rand(40))]  # row- and column-major
    table = torch.tensor([_linear_entry(w, b) for w, b in weights], dtype=torch.long, device=device)
    slots = torch.tensor([0, -1, 1], dtype=torch.int32, device=device).repeat_interleave(tokens)  # [3 * L]
    x, out = rand(3 * tokens, 80), torch.zeros(3 * tokens, 48, dtype=dtype, device=device)
    slot_linear(x, out, slots, table, tokens)
    error = 0.0
    for t, k in enumerate(slots.tolist()):
        if k < 0:
            error = max(error, out[t].abs().max().item())
            continue
        w, b = weights[k]
        want = F.linear(x[t, :70].double(), w.double(), b.double())  # [n_out]
        error = max(error, ((out[t, :len(want)].double() - want).abs() / (1 + want.abs())).max().item())
    return error


@dataclass(frozen=True)
class GroupSite:
    """One adapter's rows at one site, by its own GEMMs."""

    adapter: BottleneckAdapter
    site: Site

    def residual(self, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [n, L, H] (the adapter's rows) -> [n, L, H]."""
        return self.adapter.residual(self.site, h, x)


Parts = tuple[tuple[_Rows, GroupSite | FormSite], ...]  # rows, and what computes them


@dataclass(frozen=True)
class _SitePlan:
    """Who computes what at one site: each adapter's rows (groups), every row by slot (CPU decode),
    each form's rows (CUDA)."""

    groups: Parts
    slots: SiteSlots | None  # None: the CPU kernels cannot read some adapter's tensors here
    forms: Parts | None  # None: the Triton kernel cannot
    dtype: torch.dtype  # of the adapters' tensors


class BottleneckHooks:
    """`ResidualHooks` for one batch composition: row i of every h/x belongs to rows[i] (None: base)."""

    def __init__(self, plan: dict[Site, _SitePlan], n_rows: int) -> None:
        self._plan = plan
        self._n_rows = n_rows

    @classmethod
    def build(cls, rows: list[BottleneckAdapter | None]) -> ResidualHooks:
        """Group rows by adapter and by form once; sites no adapter of the batch uses stay `x + h`."""
        by_site: dict[Site, list[int]] = {}
        for i, adapter in enumerate(rows):
            for site in adapter.sites if adapter is not None else ():
                by_site.setdefault(site, []).append(i)
        if not by_site:
            return PLAIN
        return cls({site: _site_plan(site, rows, idx) for site, idx in by_site.items()}, len(rows))

    def after_attention(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        return self._join(("attention", layer), h, x)

    def after_ffn(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        return self._join(("output", layer), h, x)

    def _join(self, site: Site, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [N, L, H] -> [N, L, H]; base rows get exactly `x + h`."""
        if h.shape[0] != self._n_rows:
            raise ValueError(f"hooks built for {self._n_rows} rows, called with {h.shape[0]}")
        plan = self._plan.get(site)
        if plan is None:
            return x + h
        if plan.slots is not None and h.shape[1] == 1 and h.dtype == plan.dtype:
            return plan.slots.residual(h, x)
        parts = plan.forms if plan.forms is not None and h.dtype == plan.dtype else plan.groups
        if len(parts) == 1 and parts[0][0].span == slice(0, self._n_rows):
            return parts[0][1].residual(h, x)
        out = x + h  # [N, L, H]
        for rows, part in parts:
            rows.put(out, part.residual(rows.take(h), rows.take(x)))
        return out


def _site_plan(site: Site, rows: list[BottleneckAdapter | None], idx: list[int]) -> _SitePlan:
    """idx: the rows with an adapter at this site."""
    device = rows[idx[0]].device
    members: dict[int, list[int]] = {}
    for i in idx:
        members.setdefault(id(rows[i]), []).append(i)
    groups = tuple((_Rows.of(m, device), GroupSite(rows[m[0]], site)) for m in members.values())
    adapters = [rows[i] for i in idx]
    dtype = adapters[0].sites[site]["down.weight"].dtype
    here = set(idx)
    slots = SiteSlots.build(site, [a if i in here else None for i, a in enumerate(rows)]) \
        if SiteSlots.usable(adapters, site) else None
    return _SitePlan(groups, slots, _forms(site, rows, idx) if FormSite.usable(adapters, site) else None, dtype)


def _forms(site: Site, rows: list[BottleneckAdapter | None], idx: list[int]) -> Parts:
    """Each form's rows among `idx` (the rows with an adapter at this site), and its FormSite."""
    by_form: dict[tuple, list[int]] = {}
    for i in idx:
        by_form.setdefault(tuple(getattr(rows[i].spec, name) for name in FORM_FIELDS), []).append(i)
    device = rows[idx[0]].device
    return tuple((_Rows.of(m, device), FormSite.build(site, [rows[i] for i in m])) for m in by_form.values())
