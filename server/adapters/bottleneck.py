"""Serial (and parallel) bottleneck adapters, AdapterHub `seq_bn` / `double_seq_bn` / `par_bn`.

The three parts every adapter kind has:
- config: `parse_bottleneck_config` (bottleneck_format.py) -> `BottleneckSpec`;
- weights: `load_bottleneck(folder, base)` -> `BottleneckAdapter`, validated against the base;
- layer: `BottleneckHooks.build(rows)` (bottleneck_layer.py) -> the decoder's `ResidualHooks` for one
  batch composition.

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
from server.errors import AdapterFormatError
from server.model import Geometry
from server.residual import RESIDUAL_POINTS

__all__ = ["BottleneckAdapter", "BottleneckSpec", "combine", "load_bottleneck", "parse_bottleneck_config"]

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
        self.sites = {site: _served_layout(params) for site, params in sites.items()}
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
        return combine(self.spec, h, x, lambda v: self._bottleneck(p, v), lambda name, v: self._norm(p, name, v))

    def _bottleneck(self, p: dict[str, Tensor], v: Tensor) -> Tensor:
        """v: [n, L, H] -> s * up(act(down(LN_before(v)))): [n, L, H]."""
        if self.spec.ln_before:
            v = self._norm(p, "norm_before", v)
        down = self._act(F.linear(v, p["down.weight"], p["down.bias"]))  # [n, L, b]
        up = F.linear(down, p["up.weight"], p["up.bias"])  # [n, L, H]
        if "scaling" in p:
            return up * p["scaling"]
        return up if self._scale is None else up * self._scale

    def _norm(self, p: dict[str, Tensor], name: str, v: Tensor) -> Tensor:
        return F.layer_norm(v, (self.hidden,), p[f"{name}.weight"], p[f"{name}.bias"], LN_EPS)

    @property
    def act(self) -> Callable[[Tensor], Tensor]:
        return self._act

    def scaling(self, site: Site) -> Tensor | float:
        """What up(..) is multiplied by at this site: the learned [1] or [H] tensor, or the config's float."""
        p = self.sites[site]
        return p["scaling"] if "scaling" in p else (1.0 if self._scale is None else self._scale)

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


def _served_layout(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """On the CPU, up.weight [H, b] stored column-major (same values): the slot kernel
    (bottleneck_layer.py) then streams its b columns of H instead of H dots of b."""
    up = params["up.weight"]
    if up.is_cpu and not up.mT.is_contiguous():
        params = {**params, "up.weight": up.mT.contiguous().mT}
    return params


def combine(spec: BottleneckSpec, h: Tensor, x: Tensor, f: Callable[[Tensor], Tensor],
            norm: Callable[[str, Tensor], Tensor]) -> Tensor:
    """h, x: [n, L, H] -> what replaces `x + h` (the module docstring's formulas), given the rows'
    f(v) = s * up(act(down(LN_before(v)))) and their norms `norm(name, v)` ("norm_after")."""
    if spec.is_parallel:
        u = f(x)  # [n, L, H]: a parallel adapter reads the sub-block's input
        if spec.ln_after:
            u = norm("norm_after", u)
        out = u + h
        return out + x if spec.original_ln_after else out
    v = h + x if spec.original_ln_before else h  # [n, L, H]
    r = h if spec.residual_before_ln else v
    u = f(v)  # [n, L, H]
    if spec.ln_after and spec.adapter_residual_before_ln:
        o = norm("norm_after", u + r)
    elif spec.ln_after:
        o = norm("norm_after", u) + r
    else:
        o = u + r
    return o + x if spec.original_ln_after else o


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
