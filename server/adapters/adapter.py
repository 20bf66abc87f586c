"""An adapter as the server holds it: `Adapter` (resident weights a request holds) and `Entry`
(a registration: the store's manifest, and its resident Adapter if any)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from server.adapters.composition import ALORA_UNMERGED, Parts, resolve_mode
from server.adapters.kinds import Kind, Weights
from server.adapters.lora import LoraAdapter
from server.adapters.prompt import PrefixKV, PromptAdapter
from server.errors import InvalidRequestError
from server.store import CORRUPT, files_problem

MODES = ("merged", "unmerged")


@dataclass(eq=False)
class Adapter:
    """Resident weights of one registered version of an adapter; what a request holds."""

    name: str
    kind: Kind
    weights: Weights  # on the base model's device and dtype
    default_mode: str  # merged | unmerged for LoRA, none otherwise
    source: str
    created_at: float = field(default_factory=time.time)
    users: int = 0  # requests holding it; guarded by the registry's lock
    prefixes: dict[str, PrefixKV] = field(default_factory=dict, repr=False)  # a soft prompt's KV, by the engine

    @property
    def n_virtual(self) -> int:
        return self.weights.n_virtual if self.kind == "prompt" else 0

    @cached_property
    def parts(self) -> Parts:
        return Parts(**{self.kind: self.weights})

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def size_bytes(self) -> int:
        """Bytes its weights take on the device."""
        return self.weights.size_bytes

    def mode_for(self, requested: str | None) -> str:
        """The request's mode: what it asked for, else this adapter's default."""
        return resolve_mode(self.name, self.kind, self.parts.lora, self.default_mode, requested)

    def record(self) -> dict:
        return {"name": self.name, "kind": self.kind, "default_mode": self.default_mode, "resident": True,
                "memory_bytes": self.size_bytes, "created_at": self.created_at, "source": self.source,
                "in_use": self.users}


@dataclass(eq=False)
class Entry:
    """A registered adapter: its manifest (what the store holds) and its resident `Adapter`, if any."""

    manifest: dict
    folder: Path
    pinned: bool = False
    adapter: Adapter | None = None  # guarded by the registry's lock
    loading: asyncio.Task | None = None  # the one load in flight (event loop only)
    waiting: int = 0  # acquirers waiting for that load: not evictable meanwhile
    problem: str | None = None  # why a load found the files corrupt (then never served)
    pin_pending: bool = False  # shared store: pinned by another server, not yet loaded here

    name = property(lambda self: self.manifest["name"])
    kind = property(lambda self: self.manifest.get("kind"))  # None: a corrupt manifest without a known kind
    default_mode = property(lambda self: self.manifest.get("default_mode"))
    created_at = property(lambda self: self.manifest.get("created_at"))

    def unservable(self) -> str | None:
        """Why this adapter is corrupt as far as is known without reading the disk, or None."""
        return self.manifest["reason"] if self.manifest.get("status") == CORRUPT else self.problem

    def corruption(self) -> str | None:
        """Why this adapter is corrupt: its manifest, a failed load, or files missing or changed in size."""
        return self.unservable() or files_problem(self.folder, self.manifest["files"])

    def record(self) -> dict:
        """What the API shows; `status` "ok", or "corrupt" with a `reason` (reads the folder's listing)."""
        m, adapter = self.manifest, self.adapter
        reason = self.corruption()
        return {
            "name": self.name, "kind": self.kind, "default_mode": self.default_mode,
            "status": "ok" if reason is None else CORRUPT, **({} if reason is None else {"reason": reason}),
            "resident": adapter is not None, "pinned": self.pinned, "in_use": adapter.users if adapter else 0,
            "size_bytes": m.get("size_bytes", 0), "memory_bytes": adapter.size_bytes if adapter else 0,
            "created_at": self.created_at, "source": m.get("source", ""), "source_format": m.get("source_format"),
            "details": m.get("details", {}), "files": m.get("files", {}), "ignored_files": m.get("ignored_files", []),
        }


def describe(weights: Weights) -> dict:
    """The manifest's `details`: what shapes the adapter (rank, virtual tokens, reduction factor...)."""
    if isinstance(weights, LoraAdapter):
        lora = weights.spec
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        experts = [w for per_param in weights.experts.values() for w in per_param.values()]
        return {"r": lora.r, "lora_alpha": lora.lora_alpha,
                "ranks": sorted({w.rank for w in [*weights.modules.values(), *experts]}),
                "use_rslora": lora.use_rslora, "use_dora": lora.use_dora, "target_modules": targets,
                "target_parameters": list(lora.target_parameters), "n_modules": len(weights.modules),
                "alora_invocation_tokens": list(lora.alora_invocation_tokens) or None}
    if isinstance(weights, PromptAdapter):
        prompt = weights.spec
        return {"peft_type": prompt.peft_type, "num_virtual_tokens": prompt.num_virtual_tokens,
                "token_dim": prompt.token_dim}
    bn = weights.spec
    return {"reduction_factor": bn.reduction_factor, "positions": list(bn.positions()),
            "non_linearity": bn.non_linearity, "is_parallel": bn.is_parallel,
            "layers": sorted({layer for _, layer in weights.sites})}


def default_mode_for(kind: Kind, requested: str | None, activated: bool = False) -> str:
    """The default mode an upload asks for, checked; `activated`: the LoRA is an aLoRA (never merged)."""
    if activated and requested == "merged":
        raise InvalidRequestError(f"default_mode: expected unmerged, got merged ({ALORA_UNMERGED})")
    if kind != "lora":
        if requested not in (None, "", "none", "unmerged"):
            raise InvalidRequestError(f"default_mode: merged applies to LoRA adapters only, got {requested!r}")
        return "none"
    if not requested:
        return "unmerged"
    if requested not in MODES:
        raise InvalidRequestError(f"default_mode: expected merged or unmerged, got {requested!r}")
    return requested
