"""Several adapters in one request: weighted LoRAs as one LoRA, with at most one soft prompt and one
bottleneck adapter on top of the LoRA-adapted model.

    parts = check_parts([Part("a", 0.7), Part("b", 0.3), Part("style")])   # before anything is acquired
    composite = compose(held, weights)   # the acquired adapters -> a Composite (engine thread: device tensors)

A weighted set of LoRAs is itself a LoRA. Per module the ranks are concatenated,
A = [w_1 s_1 A_1; w_2 s_2 A_2] and B = [B_1, B_2] with scale 1, so that
delta = sum_i w_i s_i B_i A_i over the union of the modules they target (a module only some of them
target gets only their terms). That is what PEFT's `add_weighted_adapter(..., combination_type="cat")`
builds, in the same order of operations; everything downstream (the per-row plan, merge and restore)
takes it as any LoRA. (PEFT's combined config also copies the first adapter's `use_rslora` and
`layers_to_transform`, which rescales or drops terms when those are set; here the sum is exact.)
What a weighted sum of A and B cannot express is refused: DoRA magnitudes, lora_B biases, replaced
base biases, and an aLoRA with any other LoRA (each would need its own activation point).

A soft prompt's virtual tokens go through the whole adapted model (its LoRA and bottleneck), so their
KV differ from the soft prompt's alone: a Composite keeps its own prefix per mode.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from server.adapters.bottleneck import BottleneckAdapter
from server.adapters.lora import LoraAdapter, LoraSpec, LoraWeights
from server.adapters.prompt import PrefixKV, PromptAdapter
from server.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.adapters.adapter import Adapter

MAX_PARTS = 8  # adapters one request may combine: the combined rank is the sum of the LoRAs' ranks
MAX_COMPOSITES = 32  # distinct combinations kept built (each holds a copy of its LoRAs' weights)
KIND_ORDER = ("lora", "prompt", "bottleneck")
ALORA_UNMERGED = "an aLoRA applies from its invocation on, so it cannot be folded into the weights; PEFT refuses it too"


@dataclass(frozen=True)
class Part:
    """One entry of a request's `adapters` list."""

    name: str
    weight: float = 1.0

    @property
    def label(self) -> str:
        return self.name if self.weight == 1.0 else f"{self.name}*{self.weight:g}"


@dataclass(frozen=True)
class Parts:
    """What a request runs, by kind: at most one LoRA (plain, composed or aLoRA), soft prompt, bottleneck."""

    lora: LoraAdapter | None = None
    prompt: PromptAdapter | None = None
    bottleneck: BottleneckAdapter | None = None


NO_PARTS = Parts()


def resolve_mode(name: str, kind: str, lora: LoraAdapter | None, default: str, requested: str | None) -> str:
    """A request's mode: merged or unmerged when it runs a LoRA (what it asked, else `default`), else none."""
    if lora is None:
        if requested not in (None, "unmerged"):
            raise InvalidRequestError(f"mode: merging applies to LoRA adapters only; {name!r} is {kind}")
        return "none"
    if lora.spec.alora_invocation_tokens:
        if requested == "merged":
            raise InvalidRequestError(f"mode: expected unmerged for {name!r}, got merged ({ALORA_UNMERGED})")
        return "unmerged"
    return requested or default


@dataclass(eq=False)
class Composite:
    """The adapters one request combines, acquired; the engine reads it as one adapter."""

    name: str  # canonical, e.g. "a*0.7+b*0.3+style" ('*' and '+' never occur in a registered name)
    kind: str  # the kinds present, e.g. "lora+prompt"; weighted LoRAs alone are kind "lora"
    members: tuple[Adapter, ...]
    parts: Parts
    prefixes: dict[str, PrefixKV] = field(default_factory=dict, repr=False)  # per mode, filled by the engine
    default_mode = "unmerged"

    @property
    def n_virtual(self) -> int:
        return self.parts.prompt.n_virtual if self.parts.prompt else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def mode_for(self, requested: str | None) -> str:
        return resolve_mode(self.name, self.kind, self.parts.lora, self.default_mode, requested)

    @cached_property
    def size_bytes(self) -> int:
        """What it holds of its own on the device: the weighted sum of its LoRAs (its members hold the rest);
        computed once (a Composite never changes), since the registry sums its kept ones at each seat."""
        lora = self.parts.lora
        return 0 if lora is None or any(m.weights is lora for m in self.members) else lora.size_bytes


def check_parts(parts: list[Part]) -> tuple[Part, ...]:
    """The request's list as a canonical tuple (sorted by name); refuses what no acquisition could fix."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise InvalidRequestError(f"adapters: expected 1 to {MAX_PARTS} adapters, got {len(parts)}")
    names = [p.name for p in parts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidRequestError(f"adapters: expected each adapter once, got {twice[0]!r} more than once")
    for p in parts:
        if not math.isfinite(p.weight):
            raise InvalidRequestError(f"adapters: expected a finite weight for {p.name!r}, got {p.weight}")
    return tuple(sorted(parts, key=lambda p: p.name))


def compose(held: list[Adapter], weights: list[float]) -> Composite:
    """The acquired adapters of a request (in check_parts' order) with their weights -> one Composite.

    Tensor work on the adapters' device: the registry runs it on the engine thread."""
    by_kind: dict[str, list[tuple[Adapter, float]]] = {kind: [] for kind in KIND_ORDER}
    for adapter, weight in zip(held, weights):
        by_kind[adapter.kind].append((adapter, weight))
    for kind in ("prompt", "bottleneck"):
        _check_whole(kind, by_kind[kind])
    loras = by_kind["lora"]
    ordered = [pair for kind in KIND_ORDER for pair in by_kind[kind]]
    parts = Parts(_lora(loras) if loras else None,
                  by_kind["prompt"][0][0].weights if by_kind["prompt"] else None,
                  by_kind["bottleneck"][0][0].weights if by_kind["bottleneck"] else None)
    return Composite(name="+".join(Part(a.name, w).label for a, w in ordered),
                     kind="+".join(kind for kind in KIND_ORDER if by_kind[kind]),
                     members=tuple(a for a, _ in ordered), parts=parts)


def _check_whole(kind: str, members: list[tuple[Adapter, float]]) -> None:
    """A soft prompt and a bottleneck apply whole, one of each at most."""
    kind = {"prompt": "soft prompt", "bottleneck": "bottleneck adapter"}[kind]
    for adapter, weight in members:
        if weight != 1.0:
            raise InvalidRequestError(f"adapters: expected weight 1.0 for {adapter.name!r}, got {weight:g} (a {kind} "
                                      "applies whole; weights scale LoRAs only)")
    if len(members) > 1:
        raise InvalidRequestError(f"adapters: expected at most one {kind}, got "
                                  f"{', '.join(repr(a.name) for a, _ in members)}")


def _lora(loras: list[tuple[Adapter, float]]) -> LoraAdapter:
    """One LoRA from weighted ones: itself when alone with weight 1, else PEFT's "cat" combination."""
    if len(loras) == 1 and loras[0][1] == 1.0:
        return loras[0][0].weights
    for adapter, _ in loras:
        _check_summable(adapter, len(loras))
    names = list(dict.fromkeys(name for adapter, _ in loras for name in adapter.weights.modules))
    modules = {name: _cat([(a.weights.modules[name], w) for a, w in loras if name in a.weights.modules])
               for name in names}
    rank = sum(max(m.rank for m in a.weights.modules.values()) for a, _ in loras)
    invocation = loras[0][0].weights.spec.alora_invocation_tokens  # a single aLoRA keeps its activation
    spec = LoraSpec(r=rank, lora_alpha=rank, target_modules=tuple(names), alora_invocation_tokens=invocation)
    return LoraAdapter(spec, modules)


def _check_summable(adapter: Adapter, n_loras: int) -> None:
    spec = adapter.weights.spec
    if spec.alora_invocation_tokens and n_loras > 1:
        raise InvalidRequestError(f"adapters: expected an aLoRA alone among the LoRAs, got {adapter.name!r} with "
                                  f"{n_loras - 1} more (each aLoRA applies from its own invocation)")
    extra = next((what for what, on in (("DoRA", spec.use_dora), ("lora_bias", spec.lora_bias)) if on), None)
    if extra is None and any(w.base_bias is not None for w in adapter.weights.modules.values()):
        extra = "a trained base bias"
    if extra is not None:
        raise InvalidRequestError(f"adapters: expected plain LoRAs to weight or combine, got {adapter.name!r} with "
                                  f"{extra} (a weighted sum of A and B cannot express it, nor can PEFT's)")


def _cat(terms: list[tuple[LoraWeights, float]]) -> LoraWeights:
    """One module: A = [w_i s_i A_i] [R, in], B = [B_i] [out, R], scale 1 (PEFT's order of operations)."""
    a = torch.cat([w.A * weight * w.scale for w, weight in terms], dim=0)  # [R, in]
    b = torch.cat([w.B for w, _ in terms], dim=1)  # [out, R]
    return LoraWeights(a, b, 1.0)


class Composites:
    """The combinations built so far, by the identity of their members and the weights: at most
    MAX_COMPOSITES and at most the bytes the registry leaves them (`trim`), least recently used
    dropped first, and dropped with any member that leaves residency. A request holds its Composite
    (and its members) whatever happens here."""

    def __init__(self) -> None:
        self._built: OrderedDict[tuple, Composite] = OrderedDict()

    @staticmethod
    def key(held: list[Adapter], weights: list[float]) -> tuple:
        return tuple((id(a), w) for a, w in zip(held, weights))

    def get(self, key: tuple) -> Composite | None:
        found = self._built.get(key)
        if found is not None:
            self._built.move_to_end(key)
        return found

    def put(self, key: tuple, composite: Composite, budget: int | None) -> Composite:
        """Keep `composite` (unless one was kept meanwhile: that one is returned), within `budget` bytes."""
        kept = self._built.setdefault(key, composite)
        self._built.move_to_end(key)
        while len(self._built) > MAX_COMPOSITES:
            self._built.popitem(last=False)
        self.trim(budget)
        return kept

    def trim(self, budget: int | None) -> None:
        """Drop the least recently used until they hold at most `budget` bytes (None: no bound)."""
        while budget is not None and self._built and self.size_bytes > budget:
            self._built.popitem(last=False)

    @property
    def size_bytes(self) -> int:
        return sum(c.size_bytes for c in self._built.values())

    def forget(self, adapter: Adapter) -> None:
        """`adapter` leaves residency: no combination of it is handed out again."""
        for key in [k for k, c in self._built.items() if adapter in c.members]:
            del self._built[key]
