"""Bottleneck adapters over a batch: the decoder's `ResidualHooks` for one batch composition.

At each site (position, layer) the rows of the batch are split by *form*, the options that decide
the computation (serial or parallel, the norms and residuals, the activation), and each form's rows
are computed together, two ways:

    SlotSite   CPU, one token per row (decode): a slot table. Each distinct adapter of the form is
               a slot (the addresses of its down and up weights and biases; nothing copied) and
               server/kernels/slot_linear.cpp runs each row's down and up projections with its own
               adapter's weights (BGMV); the activation, norms, scaling and residuals run over all
               the form's rows at once, with each row's norm and scaling parameters. A row's result
               is the same whatever else is in the batch.
    groups     anywhere else (prefill, CUDA, no compiler): one group per adapter, its rows gathered,
               its GEMMs, the result put back (`BottleneckAdapter.residual`).

Base rows get exactly `x + h`. Measured on 8 decode rows of the 75M bench model (12 output sites,
hidden 768, rf 16), in BENCHMARKS.md: per step, 8 distinct adapters cost 4.7 ms by groups.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from server import kernels
from server.adapters.bottleneck import LN_EPS, BottleneckAdapter, BottleneckSpec, Site, combine
from server.residual import PLAIN, ResidualHooks

FORM_FIELDS = ("non_linearity", "original_ln_before", "original_ln_after", "residual_before_ln",
               "adapter_residual_before_ln", "ln_before", "ln_after", "is_parallel")
NORMS = ("norm_before", "norm_after")


def form(spec: BottleneckSpec) -> tuple:
    """The options of a spec that decide what its rows compute, besides their weights."""
    return tuple(getattr(spec, name) for name in FORM_FIELDS)


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
class SlotSite:
    """One form's rows at one site, by slot (see the module docstring)."""

    spec: BottleneckSpec  # of the form (any of its adapters': they agree on every form field)
    act: Callable[[Tensor], Tensor]  # the form's activation
    slot_of_row: Tensor  # [M] long: each of the form's rows -> its adapter's slot
    down: Tensor  # [S, 6] long per slot: addresses of down.weight [b, H] and down.bias, b, H, strides
    up: Tensor  # [S, 6] long per slot: addresses of up.weight [H, b] (column-major) and up.bias, H, b, strides
    width: int  # the largest b
    scale: Tensor | None  # [M, H] or [M, 1]: each row's scaling; None where every row's is 1
    norms: dict[str, tuple[Tensor, Tensor]]  # name -> each row's weight and bias, [M, 1, H] each
    keep: tuple[BottleneckAdapter, ...]  # the adapters whose tensors the tables point at

    def residual(self, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [M, 1, H] (the form's rows) -> [M, 1, H]."""
        return combine(self.spec, h, x, self._bottleneck, self._norm)

    def _bottleneck(self, v: Tensor) -> Tensor:
        """v: [M, 1, H] -> s * up(act(down(LN_before(v)))): [M, 1, H]."""
        if self.spec.ln_before:
            v = self._norm("norm_before", v)
        rows, hidden = v.shape[0], v.shape[-1]
        down = v.new_zeros(rows, self.width)  # [M, b]: past a row's own b, zeros that its up never reads
        kernels.cpu().slot_linear(v.reshape(rows, hidden).contiguous(), down, self.slot_of_row, self.down)
        up = v.new_empty(rows, hidden)  # [M, H]
        kernels.cpu().slot_linear(self.act(down).contiguous(), up, self.slot_of_row, self.up)
        return (up if self.scale is None else up * self.scale)[:, None]

    def _norm(self, name: str, v: Tensor) -> Tensor:
        weight, bias = self.norms[name]
        return torch.addcmul(bias, F.layer_norm(v, v.shape[-1:], eps=LN_EPS), weight)

    @staticmethod
    def usable(adapters: list[BottleneckAdapter], site: Site) -> bool:
        """The kernel built, and every tensor it reads on the CPU, in one dtype, contiguous (a weight
        row- or column-major)."""
        tensors = [t for a in adapters for t in a.sites[site].values()]
        return kernels.cpu() is not None and all(
            t.is_cpu and (t.is_contiguous() or t.mT.is_contiguous()) and t.dtype == tensors[0].dtype for t in tensors)

    @staticmethod
    def build(site: Site, per_row: list[BottleneckAdapter]) -> SlotSite:
        """per_row: the adapter of each of the form's rows at this site."""
        slot_of: dict[int, int] = {}
        distinct: list[BottleneckAdapter] = []
        for a in per_row:
            if id(a) not in slot_of:
                slot_of[id(a)] = len(distinct)
                distinct.append(a)
        params = [a.sites[site] for a in distinct]
        first = params[0]["down.weight"]
        down = [_entry(p["down.weight"], p["down.bias"]) for p in params]
        up = [_entry(p["up.weight"], p["up.bias"]) for p in params]
        rows = [a.sites[site] for a in per_row]
        norms = {name: tuple(torch.stack([p[f"{name}.{part}"] for p in rows])[:, None] for part in ("weight", "bias"))
                 for name in NORMS if f"{name}.weight" in rows[0]}
        spec = distinct[0].spec
        return SlotSite(spec, distinct[0].act, torch.tensor([slot_of[id(a)] for a in per_row]),
                        torch.tensor(down, dtype=torch.long), torch.tensor(up, dtype=torch.long),
                        max(e[2] for e in down), _scales(site, per_row, first), norms, tuple(distinct))


def _entry(weight: Tensor, bias: Tensor) -> list[int]:
    return [weight.data_ptr(), bias.data_ptr(), *weight.shape, *weight.stride()]


def _scales(site: Site, per_row: list[BottleneckAdapter], like: Tensor) -> Tensor | None:
    """Each row's scaling as [M, 1] (floats, [1] tensors) or [M, H] (a "channel" one); None if all 1."""
    scales = [a.scaling(site) for a in per_row]
    if all(isinstance(s, float) and s == 1.0 for s in scales):
        return None
    rows = [s.to(like.dtype) if isinstance(s, Tensor) else torch.tensor([s], dtype=like.dtype) for s in scales]
    width = max(r.numel() for r in rows)
    return torch.stack([r.expand(width) for r in rows])  # [M, 1] or [M, H]


@dataclass(frozen=True)
class GroupSite:
    """One adapter's rows at one site, by its own GEMMs."""

    adapter: BottleneckAdapter
    site: Site

    def residual(self, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [n, L, H] (the adapter's rows) -> [n, L, H]."""
        return self.adapter.residual(self.site, h, x)


Parts = tuple[tuple[_Rows, GroupSite | SlotSite], ...]  # rows, and what computes them


@dataclass(frozen=True)
class _SitePlan:
    """Who computes what at one site: each adapter's rows (groups), and each form's rows by slot."""

    groups: Parts
    slots: Parts | None  # None: some form cannot run by slot here
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
        by_slot = plan.slots is not None and h.shape[1] == 1 and h.dtype == plan.dtype
        parts = plan.slots if by_slot else plan.groups
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
    forms: dict[tuple, list[int]] = {}
    for i in idx:
        members.setdefault(id(rows[i]), []).append(i)
        forms.setdefault(form(rows[i].spec), []).append(i)
    groups = tuple((_Rows.of(m, device), GroupSite(rows[m[0]], site)) for m in members.values())
    adapters = [rows[i] for i in idx]
    dtype = adapters[0].sites[site]["down.weight"].dtype
    if not SlotSite.usable(adapters, site):
        return _SitePlan(groups, None, dtype)
    slots = tuple((_Rows.of(f, device), SlotSite.build(site, [rows[i] for i in f])) for f in forms.values())
    return _SitePlan(groups, slots, dtype)
