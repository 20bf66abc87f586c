"""The registry: adapter name -> adapter, with reference counts held by requests.

A request acquires its adapter when it is accepted and releases it when it ends,
so a delete or a replace never pulls weights from under a running request: the
old `Adapter` object lives on in the requests that hold it, new requests get the
new state (or 404).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.kinds import Kind, Weights, load_weights
from server.errors import AdapterExistsError, AdapterNotFoundError, InvalidRequestError
from server.metrics import Metrics
from server.model import BaseModel

MODES = ("merged", "unmerged")


@dataclass(eq=False)
class Adapter:
    name: str
    kind: Kind
    weights: Weights  # on the base model's device and dtype
    default_mode: str  # merged | unmerged for LoRA, none otherwise
    source: str
    created_at: float = field(default_factory=time.time)
    users: int = 0  # requests holding it; guarded by the registry's lock

    @property
    def n_virtual(self) -> int:
        return self.weights.n_virtual if self.kind == "prompt" else 0

    @property
    def size_bytes(self) -> int:
        return self.weights.size_bytes

    def mode_for(self, requested: str | None) -> str:
        """The request's mode: what it asked for, else this adapter's default."""
        if self.kind != "lora":
            if requested not in (None, "unmerged"):
                raise InvalidRequestError(f"mode: merging applies to LoRA adapters only; {self.name!r} is {self.kind}")
            return "none"
        return requested or self.default_mode

    def record(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "default_mode": self.default_mode,
            "resident": True,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "source": self.source,
            "in_use": self.users,
        }


class Registry:
    def __init__(self, base: BaseModel, metrics: Metrics) -> None:
        self.base = base
        self.metrics = metrics
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()

    def load(self, name: str, folder: Path, default_mode: str | None = None, source: str = "") -> Adapter:
        """Read and validate a folder into an Adapter on the device (not yet registered)."""
        t0 = time.perf_counter()
        kind, weights = load_weights(folder, self.base)
        mode = _default_mode(kind, default_mode)
        adapter = Adapter(name, kind, weights.to(self.base.device, self.base.dtype), mode, source or str(folder))
        self.metrics.adapter_loaded(kind, time.perf_counter() - t0)
        return adapter

    def add(self, adapter: Adapter, replace: bool = False) -> None:
        with self._lock:
            if adapter.name in self._adapters and not replace:
                raise AdapterExistsError(f"adapter {adapter.name!r} exists; use replace=true to replace it")
            self._adapters[adapter.name] = adapter
        self._publish()

    def remove(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise AdapterNotFoundError(name)
        self._publish()
        return adapter

    def get(self, name: str) -> Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise AdapterNotFoundError(name)
        return adapter

    def all(self) -> list[Adapter]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def acquire(self, name: str) -> Adapter:
        with self._lock:
            adapter = self.get(name)
            adapter.users += 1
        return adapter

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.users -= 1

    def _publish(self) -> None:
        counts = {k: 0 for k in ("lora", "prompt", "bottleneck")}
        for a in self._adapters.values():
            counts[a.kind] += 1
        for kind, n in counts.items():
            self.metrics.set_registered(kind, n)
            self.metrics.set_resident(kind, n)


def _default_mode(kind: Kind, requested: str | None) -> str:
    if kind != "lora":
        if requested not in (None, "none", "unmerged"):
            raise InvalidRequestError(f"default_mode: merged applies to LoRA adapters only, got {requested!r}")
        return "none"
    if requested is None:
        return "unmerged"
    if requested not in MODES:
        raise InvalidRequestError(f"default_mode: expected merged or unmerged, got {requested!r}")
    return requested
