"""Bottleneck adapter files: config options and weight keys, AdapterHub's and our own.

Two folder layouts are read, both ending as one `BottleneckSpec` plus a dict of canonical
keys (`layers.{i}.{attention|output}.{down|up|norm_before|norm_after}.{weight|bias}`,
`layers.{i}.{attention|output}.scaling`) to float32 tensors:

- AdapterHub `adapters` 1.x: `adapter_config.json` (options under "config") with
  `adapter.safetensors` or `pytorch_adapter.bin`; keys keep the adapter's name inside,
  e.g. `model.layers.3.output_adapters.adapters.<name>.adapter_up.weight` (GPT-2: `transformer.h.3...`).
- ours: `hotswap_bottleneck.json` with `adapter.safetensors` holding canonical keys
  (docs/bottleneck-format.md).

Pickles are read only with `torch.load(weights_only=True)`; nothing in them is executed.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from server.adapters.weights import read_json, read_pickle, read_safetensors, require_finite
from server.errors import AdapterFormatError

HUB_CONFIG = "adapter_config.json"
NATIVE_CONFIG = "hotswap_bottleneck.json"
SAFETENSORS = "adapter.safetensors"
PICKLE = "pytorch_adapter.bin"
NATIVE_VERSION = 1

# Activations of AdapterHub's `Activation_Function_Class` (transformers' ACT2FN without
# the ones that carry parameters, plus its own "leakyrelu").
ACTIVATIONS = frozenset({
    "relu", "relu2", "relu6", "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python",
    "gelu_python_tanh", "gelu_pytorch_tanh", "quick_gelu", "laplace", "leaky_relu", "leakyrelu", "linear",
    "mish", "sigmoid", "silu", "swish", "tanh",
})

# BnConfig's defaults, then the named presets of the library's ADAPTER_CONFIG_MAP.
_BN_DEFAULTS = {
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "is_parallel": False, "scaling": 1.0, "use_gating": False, "residual_before_ln": True,
    "adapter_residual_before_ln": False, "inv_adapter": None, "cross_adapter": False, "leave_out": [],
    "phm_layer": False,
}
_SEQ_BN = {**_BN_DEFAULTS, "original_ln_before": True, "mh_adapter": False, "output_adapter": True,
           "non_linearity": "relu", "reduction_factor": 16}
_DOUBLE_SEQ_BN = {**_BN_DEFAULTS, "mh_adapter": True, "output_adapter": True, "non_linearity": "swish",
                  "reduction_factor": 16}
_PAR_BN = {**_BN_DEFAULTS, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu",
           "reduction_factor": 2, "is_parallel": True, "scaling": 4.0}
PRESETS = {
    "seq_bn": _SEQ_BN, "pfeiffer": _SEQ_BN, "double_seq_bn": _DOUBLE_SEQ_BN, "houlsby": _DOUBLE_SEQ_BN,
    "par_bn": _PAR_BN, "parallel": _PAR_BN,
    "scaled_par_bn": {**_PAR_BN, "scaling": "learned"}, "scaled_parallel": {**_PAR_BN, "scaling": "learned"},
}
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
_FLAGS = ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before", "ln_after",
          "adapter_residual_before_ln", "is_parallel")
# Options with no inference-time implementation here: (name, value that is fine).
_UNSUPPORTED = (("use_gating", False), ("phm_layer", False), ("inv_adapter", None), ("cross_adapter", False))

_HUB_KEY = re.compile(
    r"^(?:.+\.)?(?:layers|h)\.(?P<layer>\d+)\.(?P<pos>attention|output)_adapters\.adapters\.(?P<name>.+)\."
    r"(?P<param>adapter_down\.\d+\.(?:weight|bias)|adapter_up\.(?:weight|bias)"
    r"|adapter_norm_(?:before|after)\.(?:weight|bias)|scaling|gate\.(?:weight|bias))$"
)
_NATIVE_KEY = re.compile(
    r"^layers\.(?P<layer>\d+)\.(?P<pos>attention|output)\."
    r"(?P<param>(?:down|up|norm_before|norm_after)\.(?:weight|bias)|scaling)$"
)


@dataclass(frozen=True)
class BottleneckSpec:
    """The options that change what a bottleneck adapter computes (AdapterHub's names)."""

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | dict[str, float]
    non_linearity: str
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    adapter_residual_before_ln: bool
    ln_before: bool
    ln_after: bool
    scaling: float | str  # a float, "learned" ([1] tensor) or "channel" ([H] tensor)
    is_parallel: bool
    leave_out: tuple[int, ...]

    def positions(self) -> tuple[str, ...]:
        """Where adapters sit: "attention" (after self-attention), "output" (after the FFN)."""
        return tuple(p for p, on in (("attention", self.mh_adapter), ("output", self.output_adapter)) if on)

    def bottleneck_dim(self, layer: int, hidden: int) -> int:
        """The library's `int(hidden // reduction_factor)`, at least 1."""
        factor = self.reduction_factor
        if isinstance(factor, dict):
            factor = factor.get(str(layer), factor.get("default"))
            if factor is None:
                raise AdapterFormatError(
                    "reduction_factor", f"an entry for layer {layer} or a 'default'", self.reduction_factor
                )
        return max(1, int(hidden // factor))

    def param_shapes(self, layer: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """Canonical parameter name -> shape, for one adapter position of one layer."""
        dim = self.bottleneck_dim(layer, hidden)
        shapes = {"down.weight": (dim, hidden), "down.bias": (dim,), "up.weight": (hidden, dim), "up.bias": (hidden,)}
        for norm, on in (("norm_before", self.ln_before), ("norm_after", self.ln_after)):
            if on:
                shapes.update({f"{norm}.weight": (hidden,), f"{norm}.bias": (hidden,)})
        if isinstance(self.scaling, str):
            shapes["scaling"] = (1,) if self.scaling == "learned" else (hidden,)
        return shapes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["leave_out"] = list(self.leave_out)
        return out


def parse_bottleneck_config(cfg: dict | str) -> BottleneckSpec:
    """An adapter_config.json / hotswap_bottleneck.json dict, its "config" part, or a preset name."""
    options = cfg.get("config", cfg) if isinstance(cfg, dict) else cfg
    if isinstance(options, str):
        if options not in PRESETS:
            raise AdapterFormatError("config", f"a dict or one of {sorted(PRESETS)}", options)
        options = PRESETS[options]
    if not isinstance(options, dict):
        raise AdapterFormatError("config", "a dict of bottleneck options", type(options).__name__)
    _check_supported(options)
    merged = {**_BN_DEFAULTS, **options}
    return BottleneckSpec(
        **{flag: _flag(merged, flag) for flag in _FLAGS},
        reduction_factor=_reduction_factor(merged["reduction_factor"]),
        non_linearity=_non_linearity(merged["non_linearity"]),
        residual_before_ln=_residual_before_ln(merged["residual_before_ln"]),
        scaling=_scaling(merged["scaling"]),
        leave_out=_leave_out(merged["leave_out"]),
    )


def _check_supported(options: dict) -> None:
    if options.get("architecture") not in (None, "bottleneck"):
        expected = "a bottleneck adapter (absent or 'bottleneck')"
        raise AdapterFormatError("architecture", expected, options["architecture"])
    for name in _REQUIRED:
        if name not in options:
            raise AdapterFormatError(name, "a value (required for a bottleneck config)", None)
    for name, fine in _UNSUPPORTED:
        if options.get(name, fine) != fine:
            raise AdapterFormatError(name, f"{fine!r} (not supported by this server)", options[name])


def _flag(options: dict, name: str) -> bool:
    value = options[name]
    if not isinstance(value, bool):
        raise AdapterFormatError(name, "true or false", value)
    return value


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AdapterFormatError(name, "a number > 0", value)
    return value


def _reduction_factor(value: object) -> float | dict[str, float]:
    if not isinstance(value, dict):
        return _positive("reduction_factor", value)
    for key in value:
        if not (key == "default" or (isinstance(key, str) and key.isdigit())):
            raise AdapterFormatError("reduction_factor", "layer indices or 'default' as keys", key)
    return {key: _positive(f"reduction_factor.{key}", v) for key, v in value.items()}


def _non_linearity(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        raise AdapterFormatError("non_linearity", f"one of {sorted(ACTIVATIONS)}", value)
    return value.lower()


def _residual_before_ln(value: object) -> bool:
    if value == "post_add":
        # With layer_norm=None (what the library passes for pre-LN decoders) its pre_forward
        # leaves the residual unset for "post_add": there is no defined output to reproduce.
        expected = "true or false ('post_add' is undefined on pre-LN decoders)"
        raise AdapterFormatError("residual_before_ln", expected, value)
    if not isinstance(value, bool):
        raise AdapterFormatError("residual_before_ln", "true or false", value)
    return value


def _scaling(value: object) -> float | str:
    if value in ("learned", "channel"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError("scaling", "a number, 'learned' or 'channel'", value)
    return float(value)


def _leave_out(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise AdapterFormatError("leave_out", "a list of layer indices", value)
    return tuple(sorted(set(value)))


@dataclass(frozen=True)
class AdapterFiles:
    """What a folder holds, read and checked for format but not yet against a base model."""

    spec: BottleneckSpec
    tensors: dict[str, Tensor]  # canonical key -> float32 tensor
    origin: dict[str, str]  # canonical key -> the key as written in the file (for messages)
    hidden_size: int | None  # as declared by the config file, if it does


def read_adapter_folder(folder: Path) -> AdapterFiles:
    """Read an AdapterHub or a native bottleneck folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError("path", "a folder holding the adapter's files", folder.name)
    native, hub = folder / NATIVE_CONFIG, folder / HUB_CONFIG
    if native.is_file() and hub.is_file():
        raise AdapterFormatError("files", f"one of {NATIVE_CONFIG} or {HUB_CONFIG}", "both")
    if native.is_file():
        return _read_native(folder, _read_json(native))
    if hub.is_file():
        return _read_hub(folder, _read_json(hub))
    expected = f"{HUB_CONFIG} (AdapterHub) or {NATIVE_CONFIG}"
    raise AdapterFormatError("files", expected, sorted(p.name for p in folder.iterdir()))


def _read_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise AdapterFormatError(path.name, "a JSON object", type(data).__name__)
    return data


def _declared_hidden(meta: dict) -> int | None:
    value = meta.get("hidden_size")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise AdapterFormatError("hidden_size", "an integer", value)
    return value


def _read_native(folder: Path, meta: dict) -> AdapterFiles:
    if meta.get("version", NATIVE_VERSION) != NATIVE_VERSION:
        raise AdapterFormatError("version", str(NATIVE_VERSION), meta["version"])
    if "config" not in meta:
        raise AdapterFormatError("config", f"the options in {NATIVE_CONFIG}", None)
    spec = parse_bottleneck_config(meta["config"])
    path = folder / SAFETENSORS
    if not path.is_file():
        raise AdapterFormatError("files", SAFETENSORS, sorted(p.name for p in folder.iterdir()))
    tensors, origin = {}, {}
    for key, value in read_tensors(path).items():
        if not _NATIVE_KEY.match(key):
            expected = "a key like layers.{i}.{attention|output}.{down|up}.{weight|bias}"
            raise AdapterFormatError(key, expected, "unexpected key")
        tensors[key], origin[key] = value, key
    return AdapterFiles(spec, tensors, origin, _declared_hidden(meta))


def _read_hub(folder: Path, meta: dict) -> AdapterFiles:
    spec = parse_bottleneck_config(meta)
    parsed = [(key, *_canonical_hub_key(key, spec), value)
              for key, value in read_tensors(_hub_weights(folder)).items() if not _is_head_key(key)]
    _check_one_name(parsed)
    tensors: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, canonical, _, value in parsed:
        if canonical in tensors and not torch.equal(tensors[canonical], value):
            expected = f"the same values as {origin[canonical]} (one module, two names)"
            raise AdapterFormatError(key, expected, "different values")
        tensors.setdefault(canonical, value)
        origin.setdefault(canonical, key)
    return AdapterFiles(spec, tensors, origin, _declared_hidden(meta))


def _check_one_name(parsed: list[tuple[str, str, str, Tensor]]) -> None:
    """All keys must carry one adapter name; name a key of the rarer one otherwise."""
    counts = Counter(name for _, _, name, _ in parsed)
    if len(counts) > 1:
        (main, _), *_ = counts.most_common()
        key, _, name, _ = min(p for p in parsed if p[2] != main)
        raise AdapterFormatError(key, f"keys of one adapter (most keys name {main!r})", name)


def _hub_weights(folder: Path) -> Path:
    for name in (SAFETENSORS, PICKLE):
        if (folder / name).is_file():
            return folder / name
    raise AdapterFormatError("files", f"{SAFETENSORS} or {PICKLE}", sorted(p.name for p in folder.iterdir()))


def _is_head_key(key: str) -> bool:
    return "heads" in key.split(".")


def _canonical_hub_key(key: str, spec: BottleneckSpec) -> tuple[str, str]:
    """`model.layers.3.output_adapters.adapters.NAME.adapter_down.0.weight` -> (`layers.3.output.down.weight`, NAME)."""
    m = _HUB_KEY.match(key)
    param = _hub_param(m.group("param"), spec) if m else None
    if param is None:
        raise AdapterFormatError(
            key,
            "a bottleneck key like model.layers.{i}.output_adapters.adapters.<name>.adapter_up.weight",
            "unexpected key",
        )
    return f"layers.{int(m.group('layer'))}.{m.group('pos')}.{param}", m.group("name")


def _hub_param(param: str, spec: BottleneckSpec) -> str | None:
    # adapter_down is Sequential([LayerNorm if ln_before], Linear, activation): the Linear's index shifts.
    linear = "adapter_down.1." if spec.ln_before else "adapter_down.0."
    if param.startswith(linear):
        return "down." + param[len(linear):]
    if spec.ln_before and param.startswith("adapter_down.0."):
        return "norm_before." + param[len("adapter_down.0."):]
    if param.startswith(("adapter_up.", "adapter_norm_before.", "adapter_norm_after.")):
        return param.replace("adapter_up.", "up.").replace("adapter_norm_", "norm_")
    if param == "scaling":
        return param
    return None


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file, or a pickle read with weights_only=True; float tensors only, as float32."""
    raw = read_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path)
    return {k: _tensor(k, v) for k, v in raw.items()}


def _tensor(key: str, value: Tensor) -> Tensor:
    if not value.is_floating_point():
        raise AdapterFormatError(key, "a floating-point tensor", value.dtype)
    require_finite(key, value)
    return value.detach().to(torch.float32).contiguous()
