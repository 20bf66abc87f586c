"""AdapterHub serial bottleneck adapters (`seq_bn`, `double_seq_bn`) written from the spec.

The layout copies what AdapterHub `adapters` 1.3.0 saves (see tests/fixtures/adapterhub):
`adapter_config.json` plus `adapter.safetensors`, every key naming the adapter, e.g.
`model.layers.{i}.output_adapters.adapters.<name>.adapter_down.0.weight`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

ADAPTERS_VERSION = "adapters.1.3.0"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"

BottleneckKind = Literal["seq_bn", "double_seq_bn"]

# Options both AdapterHub bottleneck configs share (library defaults).
_COMMON_OPTIONS: dict[str, object] = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "is_parallel": False,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "output_adapter": True,
    "original_ln_after": True,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}

# What distinguishes Pfeiffer (`seq_bn`) from Houlsby (`double_seq_bn`).
_KIND_OPTIONS: dict[str, dict[str, object]] = {
    "seq_bn": {"mh_adapter": False, "original_ln_before": True},
    "double_seq_bn": {"mh_adapter": True, "original_ln_before": False},
}


@dataclass(frozen=True)
class BottleneckSpec:
    name: str
    kind: BottleneckKind
    reduction_factor: int
    non_linearity: str


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    model_class: str
    model_type: str
    hidden_size: int
    num_layers: int


def adapter_config(spec: BottleneckSpec, base: BaseModelInfo) -> dict[str, object]:
    options = {
        **_COMMON_OPTIONS,
        **_KIND_OPTIONS[spec.kind],
        "non_linearity": spec.non_linearity,
        "reduction_factor": spec.reduction_factor,
    }
    return {
        "config": dict(sorted(options.items())),
        "hidden_size": base.hidden_size,
        "model_class": base.model_class,
        "model_name": base.name,
        "model_type": base.model_type,
        "name": spec.name,
        "version": ADAPTERS_VERSION,
    }


def _sites(kind: BottleneckKind) -> list[str]:
    return ["attention_adapters", "output_adapters"] if kind == "double_seq_bn" else ["output_adapters"]


def adapter_tensors(
    spec: BottleneckSpec, base: BaseModelInfo, generator: torch.Generator, std: float = 0.02
) -> dict[str, torch.Tensor]:
    hidden = base.hidden_size
    bottleneck = hidden // spec.reduction_factor

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    tensors: dict[str, torch.Tensor] = {}
    for layer in range(base.num_layers):
        for site in _sites(spec.kind):
            prefix = f"model.layers.{layer}.{site}.adapters.{spec.name}"
            tensors[f"{prefix}.adapter_down.0.weight"] = normal(bottleneck, hidden)  # [b, H]
            tensors[f"{prefix}.adapter_down.0.bias"] = normal(bottleneck)
            tensors[f"{prefix}.adapter_up.weight"] = normal(hidden, bottleneck)  # [H, b]
            tensors[f"{prefix}.adapter_up.bias"] = normal(hidden)
    return tensors


def write_adapter(out_dir: Path, spec: BottleneckSpec, base: BaseModelInfo, seed: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(adapter_tensors(spec, base, generator), str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, base), indent=2) + "\n")
