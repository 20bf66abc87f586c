"""PEFT LoRA adapters with PEFT 0.21.2 semantics: the config and the weights.

    spec = parse_lora_config(json)            # every field that changes inference, or a refusal
    draft = read_lora(folder, hf_model)       # any thread: files, keys and shapes against the base modules
    adapter = derive(draft, hf_model)         # engine thread: DoRA norms and bias checks on the pristine base
    ensure_wrapped(hf_model, draft.wrapped, ctx); ctx.plan = LoraPlan.build(rows)   # unmerged
    state = merge(hf_model, adapter); ...; state.restore()                            # merged

The layer side (the unmerged wrappers, their per-batch plan, merge and restore) lives in
lora_layer.py and is re-exported here; LoRA on `target_parameters` (MoE routers and experts) in
lora_params.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from server.adapters.alora import check_activation
from server.adapters.lora_layer import (
    LINEAR_TYPES,
    LoraContext,
    LoraLinear,
    LoraPlan,
    LoraWeights,
    MergeConflictError,
    MergedState,
    base_layer,
    bias_shift,
    check_mergeable,
    dora_norm,
    ensure_wrapped,
    merge,
    named_layers,
    pristine,
)
from server.adapters.lora_params import ExpertLora, ExpertsLora, ParamTarget, param_targets
from server.adapters.patterns import Matcher, check_pattern, listed
from server.adapters.weights import read_config, read_weights
from server.errors import AdapterFormatError

__all__ = [
    "LoraAdapter", "LoraContext", "LoraLinear", "LoraPlan", "LoraSpec", "LoraWeights", "MergeConflictError",
    "LoraDraft", "MergedState", "check_mergeable", "derive", "ensure_wrapped", "load_lora", "merge",
    "parse_lora_config", "read_lora",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_STEM = "adapter_model"  # adapter_model.safetensors, else adapter_model.bin (weights only)
KEY_PREFIX = "base_model.model."
# What a PEFT LoRA file holds per module, after "base_model.model.<module name>.".
PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "base_layer.bias")

PARSED = {"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
          "layers_pattern", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "use_dora", "bias", "lora_bias",
          "init_lora_weights", "target_parameters", "alora_invocation_tokens"}
# Provenance and training-only settings: no effect on a saved adapter's outputs.
INERT = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
         "lora_dropout", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
         "lora_ga_config", "runtime_config"}
# Change inference in ways this server does not implement: refused unless unset (null, false, empty).
UNSUPPORTED = ("modules_to_save", "trainable_token_indices", "layer_replication", "use_qalora",
               "arrow_config", "kasa_config", "velora_config", "monteclora_config",
               "use_bdlora", "megatron_config", "ensure_weight_tying")
# init_lora_weights whose adapters expect base weights changed at init (unless converted on save).
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# What PEFT's ParamWrapper refuses: with target_parameters these must be unset.
NOT_WITH_PARAMETERS = ("fan_in_fan_out", "lora_bias", "use_dora", "lora_dropout")


@dataclass(frozen=True)
class LoraSpec:
    """The fields of a PEFT LoraConfig that decide which modules get which LoRA."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()  # names (exact or ".name" suffix), a fullmatch regex, or "all-linear"
    target_parameters: tuple[str, ...] = ()  # parameter names (exact or ".name" suffix): MoE routers, experts
    exclude_modules: tuple[str, ...] | str = ()
    layers_to_transform: tuple[int, ...] = ()  # empty: every layer
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)  # key matched as (.*\.)?(key)$, first match wins
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False  # as PEFT: implied by the module type (Conv1D), whatever the file says
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    alora_invocation_tokens: tuple[int, ...] = ()  # aLoRA (alora.py): active from their last occurrence on
    matcher: Matcher = field(default_factory=Matcher, compare=False, repr=False)  # this config's regex budget

    def selects(self, name: str, module: nn.Module, output_layer: nn.Module | None) -> bool:
        """PEFT's check_target_module_exists (with "all-linear" expanded as PEFT does)."""
        if self._excluded(name):
            return False
        if self.target_modules == "all-linear":
            return isinstance(module, LINEAR_TYPES) and module is not output_layer
        if isinstance(self.target_modules, str):
            return self.matcher.match("target_modules", self.target_modules, name, full=True) is not None
        if name in self._target_set:
            return True
        return listed(name, self._target_set) and self._in_layers(name)

    def _excluded(self, name: str) -> bool:
        if isinstance(self.exclude_modules, str):
            return self.matcher.match("exclude_modules", self.exclude_modules, name, full=True) is not None
        return listed(name, self._exclude_set)

    @cached_property
    def _target_set(self) -> frozenset[str]:
        return frozenset(self.target_modules)

    @cached_property
    def _exclude_set(self) -> frozenset[str]:
        return frozenset(self.exclude_modules)

    @cached_property
    def _layer_set(self) -> frozenset[int]:
        return frozenset(self.layers_to_transform)

    def _in_layers(self, name: str) -> bool:
        if not self.layers_to_transform:
            return True
        patterns = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in self.layers_pattern] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for p in patterns if (m := self.matcher.match("layers_pattern", p, name))), None)
        return match is not None and int(match["idx"]) in self._layer_set

    def rank_and_scale(self, name: str) -> tuple[int, float]:
        r = self._pattern_value("rank_pattern", self.rank_pattern, name, self.r)
        alpha = self._pattern_value("alpha_pattern", self.alpha_pattern, name, self.lora_alpha)
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)

    def _pattern_value(self, key: str, patterns: dict, name: str, default):
        return next((v for k, v in patterns.items() if self.matcher.match(key, rf"(.*\.)?({k})$", name)), default)


# ---------------------------------------------------------------- config


def parse_lora_config(cfg: dict) -> LoraSpec:
    """adapter_config.json -> LoraSpec, refusing every field that would change outputs unimplemented."""
    if not isinstance(cfg, dict):
        raise AdapterFormatError(CONFIG_FILE, "a JSON object", type(cfg).__name__)
    if cfg.get("peft_type") != "LORA":
        raise AdapterFormatError("peft_type", "'LORA'", cfg.get("peft_type"))
    _refuse_unsupported(cfg)
    parameters = _parameters(cfg.get("target_parameters"))
    spec = LoraSpec(
        r=_positive_int("r", cfg.get("r", 8)),
        lora_alpha=_number("lora_alpha", cfg.get("lora_alpha", 8)),
        use_rslora=_flag(cfg, "use_rslora"),
        target_modules=_targets(cfg.get("target_modules"), parameters),
        target_parameters=parameters,
        exclude_modules=_names_or_regex("exclude_modules", cfg.get("exclude_modules")),
        layers_to_transform=_layers(cfg.get("layers_to_transform")),
        layers_pattern=_strings("layers_pattern", cfg.get("layers_pattern")),
        rank_pattern=_patterns("rank_pattern", cfg.get("rank_pattern"), _positive_int),
        alpha_pattern=_patterns("alpha_pattern", cfg.get("alpha_pattern"), _number),
        fan_in_fan_out=_flag(cfg, "fan_in_fan_out"),
        use_dora=_flag(cfg, "use_dora"),
        bias=cfg.get("bias", "none"),
        lora_bias=_flag(cfg, "lora_bias"),
        alora_invocation_tokens=_token_ids(cfg.get("alora_invocation_tokens")),
    )
    _check_combinations(spec, cfg)
    return spec


def _refuse_unsupported(cfg: dict) -> None:
    for key in (*UNSUPPORTED, *sorted(set(cfg) - PARSED - INERT - set(UNSUPPORTED))):
        if cfg.get(key):
            raise AdapterFormatError(key, "unset (not supported by this server)", cfg[key])
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_MUTATING_INITS):
        raise AdapterFormatError("init_lora_weights", "an init that leaves the base weights unchanged "
                                 "(save PiSSA/OLoRA/CorDA/LoRA-GA adapters converted to plain LoRA)", init)


def _check_combinations(spec: LoraSpec, cfg: dict) -> None:
    """PEFT's own LoraConfig (and ParamWrapper) checks, as AdapterFormatError."""
    if spec.bias not in ("none", "all", "lora_only"):
        raise AdapterFormatError("bias", "one of none, all, lora_only", spec.bias)
    if isinstance(spec.target_modules, str) and (spec.layers_to_transform or spec.layers_pattern):
        raise AdapterFormatError("layers_to_transform", "unset when target_modules is a string",
                                 list(spec.layers_to_transform))
    if spec.layers_pattern and not spec.layers_to_transform:
        raise AdapterFormatError("layers_pattern", "unset when layers_to_transform is unset", list(spec.layers_pattern))
    if spec.lora_bias and spec.use_dora:
        raise AdapterFormatError("lora_bias", "false with use_dora (PEFT refuses the pair)", True)
    for key in NOT_WITH_PARAMETERS if spec.target_parameters else ():
        if cfg.get(key):
            raise AdapterFormatError(key, "unset with target_parameters (PEFT's ParamWrapper refuses it)", cfg[key])
    if spec.alora_invocation_tokens and (spec.use_dora or spec.lora_bias or spec.bias != "none"):
        raise AdapterFormatError("alora_invocation_tokens", "an aLoRA without use_dora, lora_bias or trained "
                                 "biases (those would change the rows before the invocation)",
                                 f"use_dora={spec.use_dora}, lora_bias={spec.lora_bias}, bias={spec.bias!r}")
    if spec.alora_invocation_tokens and spec.target_parameters:
        raise AdapterFormatError("alora_invocation_tokens", "an aLoRA on modules only (target_parameters unset)",
                                 list(spec.target_parameters))


def _flag(cfg: dict, key: str) -> bool:
    value = cfg.get(key)
    if value is not None and not isinstance(value, bool):
        raise AdapterFormatError(key, "true or false", value)
    return bool(value)


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(key, "a positive integer", value)
    return value


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(key, "a finite number", value)
    return value


def _strings(key: str, value) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise AdapterFormatError(key, "a string or a list of strings", value)
    return tuple(check_pattern(key, v) for v in values if v)


def _names_or_regex(key: str, value) -> tuple[str, ...] | str:
    if isinstance(value, str):
        return check_pattern(key, value)
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return tuple(value or ())
    raise AdapterFormatError(key, "a regex string or a list of module names", value)


def _targets(value, parameters: tuple[str, ...]) -> tuple[str, ...] | str:
    if isinstance(value, str) and value.lower() == "all-linear":
        return "all-linear"
    if value == [] and parameters:  # PEFT: target_parameters alone
        return ()
    if not value:
        raise AdapterFormatError("target_modules", "a non-empty list of module names, a regex or 'all-linear' "
                                 "(an empty list with target_parameters)", value)
    return _names_or_regex("target_modules", value)


def _parameters(value) -> tuple[str, ...]:
    """target_parameters: a list of parameter names (PEFT refuses a string); matched as names, not regexes."""
    if value is None or (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        return tuple(value or ())
    raise AdapterFormatError("target_parameters", "a list of parameter names", value)


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if not value or not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise AdapterFormatError("alora_invocation_tokens", "null or a non-empty list of token ids", value)
    return tuple(value)


def _layers(value) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value or []
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise AdapterFormatError("layers_to_transform", "an integer or a list of integers", value)
    return tuple(values)


def _patterns(key: str, value, check) -> dict:
    if not isinstance(value or {}, dict):
        raise AdapterFormatError(key, "an object of module-name patterns", value)
    return {check_pattern(key, k): check(f"{key}[{k!r}]", v) for k, v in (value or {}).items()}


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class LoraAdapter:
    """A loaded, validated LoRA: per targeted module name (as the HF model names it), its weights."""

    spec: LoraSpec
    modules: dict[str, LoraWeights]  # Linear / Conv1D modules and MoE routers
    experts: dict[str, ExpertsLora] = field(default_factory=dict)  # fused experts modules (target_parameters)

    @property
    def size_bytes(self) -> int:
        weights = [*self.modules.values(), *(w for lora in self.experts.values() for w in lora.values())]
        return sum(t.numel() * t.element_size() for w in weights for t in w.tensors())

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraAdapter:
        return LoraAdapter(self.spec, {n: w.to(device, dtype) for n, w in self.modules.items()},
                           {n: {p: w.to(device, dtype) for p, w in lora.items()} for n, lora in self.experts.items()})


@dataclass(frozen=True)
class ModuleDraft:
    """One module's LoRA as read from the files, before anything that depends on the base's values."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float
    magnitude: Tensor | None  # [out] DoRA's lora_magnitude_vector
    lora_bias: Tensor | None  # [out]
    file_bias: Tensor | None  # [out] base_layer.bias as the file holds it


@dataclass(frozen=True)
class LoraDraft:
    """A LoRA folder read and checked against the base model's shapes (any thread). `derive` completes it."""

    spec: LoraSpec
    modules: dict[str, ModuleDraft]  # Linear / Conv1D modules and MoE routers
    base_copies: dict[str, Tensor]  # file key -> a tensor PEFT saves as the base has it (`_copies_base`)
    experts: dict[str, ExpertsLora]  # fused experts modules: nothing in them depends on the base's values

    @property
    def wrapped(self) -> list[str]:
        """The modules that get a LoRA wrapper (`ensure_wrapped`)."""
        return [*self.modules, *self.experts]


def load_lora(folder: Path, model: nn.Module) -> LoraAdapter:
    """Read, validate and derive a PEFT LoRA folder against `model` (the HF model, wrapped or not). fp32, CPU."""
    return derive(read_lora(folder, model), model)


def read_lora(folder: Path, model: nn.Module) -> LoraDraft:
    """Config, keys and shapes against `model`'s modules; reads no base weight values (safe in a worker)."""
    folder = Path(folder)
    spec = parse_lora_config(read_config(folder, CONFIG_FILE))
    targets = _target_names(spec, model)
    if spec.alora_invocation_tokens:
        check_activation(spec.alora_invocation_tokens, targets, model)
    params = param_targets(spec.target_parameters, named_layers(model), set(targets))
    parts, base_copies = _split_keys(read_weights(folder, WEIGHTS_STEM), [*targets, *(p.path for p in params)], model)
    modules = {name: _module_draft(spec, model, name, parts.get(name, {})) for name in targets}
    experts: dict[str, ExpertsLora] = {}
    for p in params:  # a router's weight: a module LoRA (patterns matched on the parameter's key); experts: 3-D
        if p.param == "weight":
            modules[p.module] = _module_draft(spec, model, p.module, parts.get(p.path, {}), key=p.key)
        else:
            experts.setdefault(p.module, {})[p.param] = _expert_lora(spec, model, p, parts.get(p.path, {}))
    return LoraDraft(spec, modules, base_copies, experts)


def derive(draft: LoraDraft, model: nn.Module) -> LoraAdapter:
    """What depends on the pristine base weights: bias checks, DoRA norms, bias shifts.

    The server runs this on the engine thread only, where no merge can be changing the weights."""
    for key, tensor in draft.base_copies.items():
        _check_base_copy(model, key, tensor)
    modules = {name: _module_weights(model, name, d) for name, d in draft.modules.items()}
    return LoraAdapter(draft.spec, modules, draft.experts)


def _target_names(spec: LoraSpec, model: nn.Module) -> list[str]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output = output.base_layer if isinstance(output, LoraLinear) else output
    names = []
    for name, module in named_layers(model):
        if not spec.selects(name, module, output):
            continue
        if not isinstance(module, LINEAR_TYPES):
            raise AdapterFormatError("target_modules", "only nn.Linear or Conv1D modules",
                                     f"{name} ({type(module).__name__})")
        names.append(name)
    if not names and not spec.target_parameters:
        raise AdapterFormatError("target_modules", "to select at least one module of the base model",
                                 spec.target_modules)
    return names


def _split_keys(tensors: dict[str, Tensor], targets: list[str], model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """File keys -> ({module name: {part: (key, tensor)}}, {key: a copy of a base tensor (`_copies_base`)})."""
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    extra: dict[str, Tensor] = {}
    targeted = set(targets)
    for key, tensor in tensors.items():
        rest = key.removeprefix(KEY_PREFIX)
        part = next((p for p in PARTS if rest.endswith(f".{p}")), None)
        name = rest[: -len(part) - 1] if part else rest.removesuffix(".bias")
        if key.startswith(KEY_PREFIX) and part and name in targeted:
            parts.setdefault(name, {})[part] = (key, tensor)
        elif key.startswith(KEY_PREFIX) and not part and _copies_base(rest, targeted):
            extra[key] = tensor
        else:
            raise AdapterFormatError(key, f"'{KEY_PREFIX}<module>.<part>', <module> selected by the config and "
                                     f"<part> one of {', '.join(PARTS)}", _why_unknown(model, key, name))
    return parts, extra


def _why_unknown(model: nn.Module, key: str, name: str) -> str:
    if not key.startswith(KEY_PREFIX):
        return f"a key without the prefix {KEY_PREFIX!r}"
    try:
        model.get_submodule(name)
    except AttributeError:
        return f"{name}: no such module in the base model"
    return f"{name}: a module not selected by target_modules / exclude_modules / layers_to_transform"


def _copies_base(rest: str, targeted: set[str]) -> bool:
    """Whether a key (past KEY_PREFIX) is one PEFT saves with the base's own values: the bias of a
    module no LoRA targets (bias="all" saves every bias), or the base weight of a targeted
    embedding layer (save_embedding_layers, on by default when lm_head is a target)."""
    if rest.endswith(".bias"):
        return rest.removesuffix(".bias") not in targeted
    return rest.endswith(".base_layer.weight") and rest.removesuffix(".base_layer.weight") in targeted


def _check_base_copy(model: nn.Module, key: str, tensor: Tensor) -> None:
    """Serve a copy of a base tensor only where it equals the base's (as PEFT would load it, in the
    base's dtype): every adapter runs over one frozen base."""
    name, attr = key.removeprefix(KEY_PREFIX).replace(".base_layer.", ".").rsplit(".", 1)
    try:
        base = getattr(base_layer(model, name), attr)
    except AttributeError as e:
        raise AdapterFormatError(key, f"the {attr} of a module of the base model", f"no such module or {attr}") from e
    if base is None or base.shape != tensor.shape:
        raise AdapterFormatError(key, f"shape {None if base is None else tuple(base.shape)}", tuple(tensor.shape))
    if not torch.equal(pristine(model, name, attr).cpu(), tensor.to(base.dtype)):
        why = "a trained bias is served only on a LoRA-targeted module" if attr == "bias" else \
            "adapters that change the base's own weights, e.g. a trained or resized embedding layer, need their own base"
        raise AdapterFormatError(key, f"the base model's {attr} ({why})", f"a different {attr}")


def _module_draft(spec: LoraSpec, model: nn.Module, name: str, parts: dict, key: str | None = None) -> ModuleDraft:
    """key: what rank/alpha patterns match (a router's: its parameter's name, `<module>.weight`)."""
    layer = base_layer(model, name)
    n_in, n_out = _in_out(layer)
    r, scale = spec.rank_and_scale(key or name)
    a = _tensor(parts, name, "lora_A.weight", (r, n_in), required=True)
    b = _tensor(parts, name, "lora_B.weight", (n_out, r), required=True)
    lora_bias = _tensor(parts, name, "lora_B.bias", (n_out,), required=spec.lora_bias, allowed=spec.lora_bias)
    magnitude = _tensor(parts, name, "lora_magnitude_vector", (n_out,), required=spec.use_dora,
                        allowed=spec.use_dora)
    file_bias = _tensor(parts, name, "base_layer.bias", (n_out,))
    if file_bias is not None and getattr(layer, "bias", None) is None:  # a router has no bias attribute
        raise AdapterFormatError(f"{KEY_PREFIX}{name}.base_layer.bias", f"no bias ({name} has none)", "a bias")
    return ModuleDraft(a, b, scale, magnitude, lora_bias, file_bias)


def _expert_lora(spec: LoraSpec, model: nn.Module, target: ParamTarget, parts: dict) -> ExpertLora:
    """A fused experts Parameter's lora_A / lora_B, checked against its shape [E, out, in]."""
    n_experts, n_out, n_in = getattr(base_layer(model, target.module), target.param).shape
    r, scale = spec.rank_and_scale(target.key)
    fits = f"{target.key} [{n_experts}, {n_out}, {n_in}] at rank {r}"
    a = _tensor(parts, target.path, "lora_A.weight", (r * n_experts, n_in), required=True, fits=fits)
    b = _tensor(parts, target.path, "lora_B.weight", (n_out, r * n_experts), required=True, fits=fits)
    extra = sorted(key for part, (key, _) in parts.items() if part not in ("lora_A.weight", "lora_B.weight"))
    if extra:
        raise AdapterFormatError(extra[0], f"only lora_A.weight and lora_B.weight for {target.key}", "present")
    return ExpertLora.from_peft(a, b, n_experts, scale)


def _module_weights(model: nn.Module, name: str, d: ModuleDraft) -> LoraWeights:
    base_bias = _replaced_bias(model, name, d.file_bias)
    dora = None if d.magnitude is None else d.magnitude / dora_norm(model, name, d.A, d.B, d.scale)
    shift = bias_shift(model, name, d.scale, d.lora_bias, base_bias)
    return LoraWeights(d.A, d.B, d.scale, dora, d.lora_bias, base_bias, shift)


def _in_out(layer: nn.Module) -> tuple[int, int]:
    # nn.Linear weight: [out, in]; transformers Conv1D weight: [in, out]
    n_a, n_b = layer.weight.shape
    return (n_a, n_b) if isinstance(layer, Conv1D) else (n_b, n_a)


def _tensor(parts: dict, name: str, part: str, shape: tuple[int, ...], required: bool = False,
            allowed: bool = True, fits: str | None = None) -> Tensor | None:
    """One part of a module's file entry, checked: present iff expected, shape, finite. fp32.

    name: the module (or ParamWrapper) the file keys it under; fits: what the shape fits, if not that."""
    key, tensor = parts.get(part, (f"{KEY_PREFIX}{name}.{part}", None))
    if tensor is None:
        if required:
            raise AdapterFormatError(key, f"a tensor of shape {shape} for targeted {fits or 'module ' + name}",
                                     "missing")
        return None
    if not allowed:
        raise AdapterFormatError(key, "no such tensor (its config flag, lora_bias or use_dora, is false)", "present")
    if tuple(tensor.shape) != shape or not tensor.is_floating_point():
        raise AdapterFormatError(key, f"a float tensor of shape {shape} to fit {fits or name}",
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise AdapterFormatError(key, "finite values", "NaN or Inf")
    return tensor.float()


def _replaced_bias(model: nn.Module, name: str, bias: Tensor | None) -> Tensor | None:
    """The file's base_layer.bias (bias="all"/"lora_only"), or None where it equals the base's."""
    if bias is None:
        return None
    return None if torch.equal(bias, pristine(model, name, "bias").float().cpu()) else bias
