"""Serial (and parallel) bottleneck adapters, AdapterHub `seq_bn` / `double_seq_bn` / `par_bn`.

The three parts every adapter kind has:
- config: `parse_bottleneck_config` (bottleneck_format.py) -> `BottleneckSpec`;
- weights: `load_bottleneck(folder, base)` -> `BottleneckAdapter`, validated against the base;
- layer: `BottleneckHooks.build(rows)` -> the decoder's `ResidualHooks` for one batch composition.

What one adapter computes where the decoder would add `x + h` (h: sub-block output, x: its
residual input), as AdapterHub 1.3.0 does for pre-LN decoders (Llama, Mistral, GPT-2), which hand the
adapter layer `layer_norm=None`, so no base norm is ever applied by the adapter:

    f(v)  = s * up(act(down(LN_before(v))))          LN_before only with ln_before
    serial:   v = h + x if original_ln_before else h
              r = h if residual_before_ln else v
              o = LN_after(f(v) + r)    if ln_after and adapter_residual_before_ln
                  LN_after(f(v)) + r    if ln_after
                  f(v) + r              otherwise
              out = o + x if original_ln_after else o
    parallel: out = h + (LN_after(f(x)) if ln_after else f(x)) (+ x if original_ln_after)

seq_bn:        out = (h + x) + f(h + x) at the FFN;  double_seq_bn: out = x + h + f(h) at both.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from transformers.activations import get_activation

from server.adapters.bottleneck_format import (
    NATIVE_CONFIG,
    NATIVE_VERSION,
    SAFETENSORS,
    AdapterFiles,
    BottleneckSpec,
    parse_bottleneck_config,
    read_adapter_folder,
)
from server.decoder import PLAIN, ResidualHooks
from server.errors import AdapterFormatError
from server.model import Geometry
from server.residual import RESIDUAL_POINTS

__all__ = ["BottleneckAdapter", "BottleneckHooks", "BottleneckSpec", "load_bottleneck", "parse_bottleneck_config"]

Site = tuple[str, int]  # (position: "attention" | "output", layer index)
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which AdapterHub's adapter norms use


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """AdapterHub's Activation_Function_Class: transformers' ACT2FN, plus "leakyrelu"."""
    if name == "leakyrelu":
        return F.leaky_relu
    return get_activation(name)


class BottleneckAdapter:
    """One loaded bottleneck adapter: per (position, layer) site, its parameters by canonical name."""

    def __init__(self, spec: BottleneckSpec, hidden: int, sites: dict[Site, dict[str, Tensor]]) -> None:
        self.spec = spec
        self.hidden = hidden
        self.sites = sites
        self._act = activation(spec.non_linearity)
        self._scale = None if isinstance(spec.scaling, str) or spec.scaling == 1.0 else spec.scaling

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for params in self.sites.values() for t in params.values())

    @property
    def device(self) -> torch.device:
        return next(iter(next(iter(self.sites.values())).values())).device

    def to(self, device: torch.device | str, dtype: torch.dtype) -> BottleneckAdapter:
        """A copy on `device` in `dtype` (the base model's); this one is left as it is."""
        moved = {site: {k: t.to(device=device, dtype=dtype) for k, t in p.items()} for site, p in self.sites.items()}
        return BottleneckAdapter(self.spec, self.hidden, moved)

    def residual(self, site: Site, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [n, L, H] -> [n, L, H]: what replaces `x + h` at this site, for this adapter's rows."""
        p = self.sites[site]
        if self.spec.is_parallel:
            return self._parallel(p, h, x)
        return self._serial(p, h, x)

    def _serial(self, p: dict[str, Tensor], h: Tensor, x: Tensor) -> Tensor:
        spec = self.spec
        v = h + x if spec.original_ln_before else h  # [n, L, H]
        r = h if spec.residual_before_ln else v
        u = self._bottleneck(p, v)  # [n, L, H]
        if spec.ln_after and spec.adapter_residual_before_ln:
            o = self._norm(p, "norm_after", u + r)
        elif spec.ln_after:
            o = self._norm(p, "norm_after", u) + r
        else:
            o = u + r
        return o + x if spec.original_ln_after else o

    def _parallel(self, p: dict[str, Tensor], h: Tensor, x: Tensor) -> Tensor:
        u = self._bottleneck(p, x)  # [n, L, H]: a parallel adapter reads the sub-block's input
        if self.spec.ln_after:
            u = self._norm(p, "norm_after", u)
        out = u + h
        return out + x if self.spec.original_ln_after else out

    def _bottleneck(self, p: dict[str, Tensor], v: Tensor) -> Tensor:
        """v: [n, L, H] -> s * up(act(down(v))): [n, L, H]."""
        if self.spec.ln_before:
            v = self._norm(p, "norm_before", v)
        down = self._act(F.linear(v, p["down.weight"], p["down.bias"]))  # [n, L, b]
        up = F.linear(down, p["up.weight"], p["up.bias"])  # [n, L, H]
        if "scaling" in p:
            return up * p["scaling"]
        return up if self._scale is None else up * self._scale

    def _norm(self, p: dict[str, Tensor], name: str, v: Tensor) -> Tensor:
        return F.layer_norm(v, (self.hidden,), p[f"{name}.weight"], p[f"{name}.bias"], LN_EPS)

    def to_safetensors_dict(self) -> dict[str, Tensor]:
        """Canonical keys (`layers.{i}.{position}.{param}`) -> contiguous CPU tensors."""
        return {
            f"layers.{layer}.{pos}.{name}": t.detach().to("cpu").contiguous()
            for (pos, layer), params in sorted(self.sites.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            for name, t in params.items()
        }

    def native_config(self) -> dict:
        """The hotswap_bottleneck.json that goes with `to_safetensors_dict()`."""
        return {"version": NATIVE_VERSION, "hidden_size": self.hidden, "config": self.spec.to_dict()}

    def save_native(self, folder: Path) -> None:
        """Write hotswap_bottleneck.json + adapter.safetensors (e.g. for a `.bin` upload); no pickle kept."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / NATIVE_CONFIG).write_text(json.dumps(self.native_config(), indent=2) + "\n", encoding="utf-8")
        save_file(self.to_safetensors_dict(), str(folder / SAFETENSORS))


def load_bottleneck(folder: Path, base: object) -> BottleneckAdapter:
    """Read and validate an AdapterHub or native bottleneck folder against the base model.

    `base` is the model's `Geometry` or anything with a `.geometry` (BaseModel). Returns float32
    CPU weights; call `.to(device, dtype)` before use. Raises AdapterFormatError naming the field.
    """
    geometry: Geometry = getattr(base, "geometry", base)
    _check_family(base)
    files = read_adapter_folder(Path(folder))
    if files.hidden_size is not None and files.hidden_size != geometry.hidden:
        raise AdapterFormatError("hidden_size", f"{geometry.hidden} (the base model's)", files.hidden_size)
    return BottleneckAdapter(files.spec, geometry.hidden, _sites(files, geometry))


def _check_family(base: object) -> None:
    """Bottleneck adapters join at residual points known per family (server/residual.py)."""
    decoder = getattr(base, "decoder", None)
    if decoder is not None and decoder.residual is None:
        expected = f"a base model of a family AdapterHub serves bottleneck adapters on ({', '.join(RESIDUAL_POINTS)})"
        raise AdapterFormatError("model_type", expected, decoder.model.config.model_type)


def _sites(files: AdapterFiles, geometry: Geometry) -> dict[Site, dict[str, Tensor]]:
    spec, left = files.spec, dict(files.tensors)
    positions = spec.positions()
    sites: dict[Site, dict[str, Tensor]] = {}
    for layer in range(geometry.n_layers):
        if layer in spec.leave_out or not positions:
            continue
        shapes = spec.param_shapes(layer, geometry.hidden)
        for pos in positions:
            sites[(pos, layer)] = {name: _take(files, left, f"layers.{layer}.{pos}.{name}", shape)
                                   for name, shape in shapes.items()}
    if left:
        key = min(left)
        raise AdapterFormatError(files.origin[key], _unexpected_reason(key, spec, geometry), "unexpected key")
    if not sites:
        raise AdapterFormatError("config", "at least one layer with mh_adapter or output_adapter", "no adapter sites")
    return sites


def _take(files: AdapterFiles, left: dict[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    if key not in left:
        raise AdapterFormatError(key, f"a tensor of shape {list(shape)} (required by the config)", "missing key")
    t = left.pop(key)
    if tuple(t.shape) != shape:
        expected = f"shape {list(shape)} (base hidden size and reduction_factor)"
        raise AdapterFormatError(files.origin[key], expected, list(t.shape))
    return t


def _unexpected_reason(key: str, spec: BottleneckSpec, geometry: Geometry) -> str:
    layer, pos = int(key.split(".")[1]), key.split(".")[2]
    if layer >= geometry.n_layers:
        return f"a layer index below {geometry.n_layers} (the base model's layer count)"
    if layer in spec.leave_out or pos not in spec.positions():
        return "no tensor here: the config's leave_out / mh_adapter / output_adapter exclude this site"
    return "only the parameters the config implies (ln_before, ln_after, scaling)"


@dataclass(frozen=True)
class _Rows:
    """The rows of one adapter in the batch: a slice when contiguous, else an index tensor."""

    span: slice | None
    index: Tensor | None  # [k] long, on the adapter's device

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


class BottleneckHooks:
    """`ResidualHooks` for one batch composition: row i of every h/x belongs to rows[i] (None: base)."""

    def __init__(self, plan: dict[Site, tuple[tuple[_Rows, BottleneckAdapter], ...]], n_rows: int) -> None:
        self._plan = plan
        self._n_rows = n_rows

    @classmethod
    def build(cls, rows: list[BottleneckAdapter | None]) -> ResidualHooks:
        """Group rows by adapter once; sites no adapter of the batch uses stay `x + h`."""
        members: dict[int, tuple[BottleneckAdapter, list[int]]] = {}
        for i, adapter in enumerate(rows):
            if adapter is not None:
                members.setdefault(id(adapter), (adapter, []))[1].append(i)
        if not members:
            return PLAIN
        plan: dict[Site, list[tuple[_Rows, BottleneckAdapter]]] = {}
        for adapter, idx in members.values():
            selected = _Rows.of(idx, adapter.device)
            for site in adapter.sites:
                plan.setdefault(site, []).append((selected, adapter))
        return cls({site: tuple(groups) for site, groups in plan.items()}, len(rows))

    def after_attention(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        return self._join(("attention", layer), h, x)

    def after_ffn(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        return self._join(("output", layer), h, x)

    def _join(self, site: Site, h: Tensor, x: Tensor) -> Tensor:
        """h, x: [N, L, H] -> [N, L, H]; base rows get exactly `x + h`."""
        if h.shape[0] != self._n_rows:
            raise ValueError(f"hooks built for {self._n_rows} rows, called with {h.shape[0]}")
        groups = self._plan.get(site)
        if groups is None:
            return x + h
        if len(groups) == 1 and groups[0][0].span == slice(0, self._n_rows):
            return groups[0][1].residual(site, h, x)
        out = x + h  # [N, L, H]
        for rows, adapter in groups:
            rows.put(out, adapter.residual(site, rows.take(h), rows.take(x)))
        return out
