"""The registry: adapter name -> registration (files in the store) -> resident weights (on the device).

Thousands of adapters may be registered; a registration holds only its manifest. A bounded set is
resident: the LRU below, bounded by count and bytes, where pinned adapters stay and an adapter a
request holds (`users > 0`) is never evicted. A request acquires its adapter, which loads it on
first use (in a worker thread, once however many requests ask at the same time; the request only
waits) and releases it when it ends. A new adapter is loaded and validated before anything is
evicted; when nothing can be evicted, the acquiring request waits (bounded) for a release.

A delete or a replace never pulls weights from under a running request: the old `Adapter` object
lives on in the requests that hold it (an "orphan", still counted as resident until its last
user releases it); new requests get the new state, or 404.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from server.adapters.adapter import Adapter, Entry, default_mode_for, describe
from server.adapters.composition import Composite, Composites, Part, compose
from server.adapters.kinds import complete, read_adapter
from server.errors import (
    AdapterCapacityError,
    AdapterLoadError,
    AdapterExistsError,
    AdapterFormatError,
    AdapterNotFoundError,
    HotswapError,
    InvalidRequestError,
    strip_paths,
)
from server.metrics import ADAPTER_KINDS, Metrics
from server.model import BaseModel
from server.store import (
    Store,
    StoreCorruptError,
    check_name,
    new_manifest,
    normalise,
    select,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

ACQUIRE_TIMEOUT_S = 60.0  # longest a request waits for a resident slot before 503
SHARED_STALE_S = 3600.0  # shared store: start-up recovery touches only leftovers older than this


class Registry:
    def __init__(self, base: BaseModel, metrics: Metrics, store: Store, max_resident: int = 64,
                 max_memory_bytes: int = 0, shared: bool = False) -> None:
        self.base = base
        self.shared = shared  # other servers write the store too: read manifests again before use
        self.metrics = metrics
        self.store = store
        self.max_resident = max_resident  # 0: unbounded
        self.max_memory_bytes = max_memory_bytes  # 0: unbounded
        self.peak_resident = 0
        self._entries: dict[str, Entry] = {}
        self._resident: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self._orphans: dict[int, Adapter] = {}  # deleted or replaced, still held by requests
        self._composites = Composites()  # combinations of resident adapters, built once each
        self._lock = threading.Lock()  # the maps above and `users`; never held across I/O or an await
        self._admin = threading.Lock()  # serialises writes to the store
        self._model_lock = threading.Lock()  # one load at a time touches the base model (LoRA wraps modules)
        # Runs what reads the base weights' values or places tensors on the device; the app sets it to
        # Engine.call once the engine exists, so that never overlaps a merge. Until then: in this thread.
        self.on_engine: Callable[[Callable[[], T]], T] = lambda fn: fn()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future] = []  # admissions waiting for a release (event loop only)
        self._combining = asyncio.Lock()  # one request at a time acquires the members of a combination

    # ---- registrations ---------------------------------------------------------------

    def open(self) -> None:
        """Recover the store from any interrupted write and register what it holds (manifests only)."""
        self.store.recover(SHARED_STALE_S if self.shared else 0.0)
        for manifest in self.store.manifests():  # corrupt ones too: listed, deletable, replaceable, never served
            self._entries[manifest["name"]] = self._entry(manifest)
        self._publish()

    def sync(self, name: str | None = None) -> None:
        """Shared store: take in what other servers did (uploads, replaces, deletes, pins), for `name` or all.

        A replaced or deleted adapter leaves residency; requests holding it finish on it. Blocking.
        What another server pinned (or replaced while pinned) is marked for `pending_pins`.
        """
        if name is None:
            stored = {m["name"]: m for m in self.store.manifests()}
        else:
            manifest = self.store.manifest(name)
            stored = {name: manifest} if manifest else {}
        with self._admin, self._lock:
            changed = [n for n in (stored.keys() | self._entries.keys() if name is None else {name})
                       if self._sync_one(n, stored.get(n))]
        if changed:
            log.info("store: took in changes to %s", ", ".join(sorted(changed)))
            self._publish()
            self._wake_soon()

    def pending_pins(self) -> list[str]:
        """The adapters other servers pinned that this one has not loaded since (each named once):
        `load_pinned` loads them, as a pin loads its adapter at once where it was made."""
        with self._lock:
            pending = [e for e in self._entries.values() if e.pin_pending]
            for entry in pending:
                entry.pin_pending = False
        return sorted(e.name for e in pending if e.adapter is None)

    def _sync_one(self, name: str, manifest: dict | None) -> bool:
        """Under both locks: make `name`'s entry match the stored manifest; True if it changed."""
        entry = self._entries.get(name)
        if manifest is None:
            if entry is not None:
                self._unseat(self._entries.pop(name))
            return entry is not None
        if entry is not None and _same_version(entry.manifest, manifest):
            pinned = bool(manifest.get("pinned"))
            entry.pin_pending = entry.pin_pending or (pinned and not entry.pinned)
            entry.manifest["pinned"] = entry.pinned = pinned
            return False
        if entry is not None:
            self._unseat(entry)
        self._entries[name] = new = self._entry(manifest)
        new.pin_pending = new.pinned
        return True

    def _entry(self, manifest: dict) -> Entry:
        return Entry(manifest, self.store.folder(manifest["name"]), pinned=bool(manifest.get("pinned")))

    def get(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(name)
        return entry

    def all(self) -> list[Entry]:
        with self._lock:
            entries = list(self._entries.values())
        return sorted(entries, key=lambda e: e.name)

    def register(self, name: str, raw: Path, staging: Path, *, default_mode: str | None = None,
                 replace: bool = False, source: str = "upload") -> Entry:
        """Normalise, validate against the base model and store a raw adapter folder (blocking: worker thread).

        `staging` is an empty folder from `store.staging()`; the caller discards it afterwards.
        """
        check_name(name)
        if name == self.base.name:
            raise InvalidRequestError(f"name: expected a name other than the base model's, which `model` means on "
                                      f"the OpenAI API (an adapter of that name could not be reached there), got {name!r}")
        if not replace and name in self._entries:
            raise AdapterExistsError(f"adapter {name!r} exists; use replace=true to replace it")
        sel = _untrusted(select, raw)
        built = staging / "adapter"
        files = _untrusted(normalise, sel, built)
        with self._model_lock:
            kind, draft = _untrusted(read_adapter, built, self.base)
        mode = default_mode_for(sel.kind, default_mode, kind == "lora" and bool(draft.spec.alora_invocation_tokens))
        weights = _untrusted(self.on_engine, lambda: complete(draft, self.base))
        need = self._device_bytes(weights.size_bytes)
        if self.max_memory_bytes and need > self.max_memory_bytes:
            raise AdapterFormatError("weights", f"at most {self.max_memory_bytes} bytes on the device "
                                     "(--max-adapter-memory-bytes)", f"{need} bytes")
        manifest = new_manifest(name, sel, files, describe(weights), default_mode=mode, source=source,
                                base_model=self.base.name, weights_bytes=weights.size_bytes)
        del weights  # validated; registered adapters hold no tensors until first use
        with self._admin:
            old = self._entries.get(name)
            if old is not None and not replace:
                raise AdapterExistsError(f"adapter {name!r} exists; use replace=true to replace it")
            manifest["pinned"] = bool(old and old.pinned)
            self.store.write_manifest(built, manifest)
            self.store.commit(built, name, replace)
            entry = Entry(manifest, self.store.folder(name), pinned=manifest["pinned"])
            with self._lock:
                self._entries[name] = entry
                if old is not None:
                    self._unseat(old)
        log.info("registered %s (%s, %s)%s", name, kind, manifest["source_format"], " replacing" if old else "")
        self._publish()
        self._wake_soon()
        return entry

    def import_folder(self, name: str, folder: Path, *, source: str, replace: bool = False,
                      skip_unchanged: bool = False) -> Entry:
        """Register a folder on the server's disk (a copy goes into the store). Blocking."""
        if not folder.is_dir():
            raise InvalidRequestError(f"{source}: expected an adapter folder, got {'a file' if folder.exists() else 'no such path'}")
        current = self._entries.get(name)
        if skip_unchanged and current and current.manifest.get("source_sha256") == _untrusted(select, folder).source_sha256():
            return current
        staging = self.store.staging()
        try:
            return self.register(name, folder, staging, replace=replace, source=source)
        finally:
            self.store.discard(staging)

    def unregister(self, name: str) -> None:
        """Delete from the store and the registry; requests holding it finish on it. Blocking."""
        with self._admin:
            if name not in self._entries:
                raise AdapterNotFoundError(name)
            try:
                self.store.remove(name)
            except AdapterNotFoundError:
                log.warning("store: %s was already gone from disk", name)
            with self._lock:
                self._unseat(self._entries.pop(name))
        log.info("deleted %s", name)
        self._publish()
        self._wake_soon()

    async def pin(self, name: str, pinned: bool = True) -> Entry:
        """Pin (load now, never evict) or unpin; the flag is kept in the manifest."""
        adapter = await self.acquire(name) if pinned else None
        try:
            return await asyncio.to_thread(self._set_pinned, name, pinned)
        finally:
            if adapter is not None:
                self.release(adapter)

    def _set_pinned(self, name: str, pinned: bool) -> Entry:
        with self._admin:
            entry = self.get(name)
            if entry.pinned != pinned:
                self.store.write_manifest(entry.folder, {**entry.manifest, "pinned": pinned})
                entry.manifest["pinned"] = entry.pinned = pinned
        self._wake_soon()
        return entry

    async def load_pinned(self, names: list[str] | None = None) -> None:
        """Load the pinned adapters among `names` (None: all of them); one that fails is logged."""
        for name in [e.name for e in self.all() if e.pinned] if names is None else names:
            try:
                self.release(await self.acquire(name))
            except HotswapError as exc:
                log.warning("pinned adapter %s not loaded: %s", name, exc.message)

    # ---- requests --------------------------------------------------------------------

    async def acquire(self, name: str, deadline: float | None = None) -> Adapter:
        """The adapter's resident weights, loading them on first use; the caller must `release` it.
        A slot is waited for until `deadline` (event-loop time; None: ACQUIRE_TIMEOUT_S from now)."""
        self._loop = asyncio.get_running_loop()
        deadline = self._loop.time() + ACQUIRE_TIMEOUT_S if deadline is None else deadline
        if self.shared:
            await asyncio.to_thread(self.sync, name)
        while True:
            with self._lock:
                entry = self.get(name)
                if entry.adapter is not None:
                    return self._take(entry)
                if (reason := entry.unservable()) is not None:
                    raise _corrupt_error(name, reason)
                if entry.loading is None:
                    entry.loading = self._loop.create_task(self._load(entry, deadline))
                task = entry.loading
                entry.waiting += 1
            try:
                await asyncio.shield(task)
            except HotswapError as exc:
                with self._lock:
                    entry.waiting -= 1
                await asyncio.to_thread(self._settle, name)  # a delete or replace that broke the load: let it land
                if self._entries.get(name) is not entry:
                    continue  # deleted or replaced while loading: look again (404, or the new version)
                if isinstance(exc, StoreCorruptError):
                    entry.problem = exc.message  # listed as corrupt from now on
                    raise _corrupt_error(name, exc.message) from exc
                raise
            except asyncio.CancelledError:
                with self._lock:
                    entry.waiting -= 1
                    abandoned = entry.waiting == 0
                if abandoned:
                    self._wake()  # a load waiting for a slot sees that nobody wants it now
                raise
            with self._lock:
                entry.waiting -= 1
                if entry.adapter is not None and self._entries.get(name) is entry:
                    return self._take(entry)

    async def acquire_all(self, parts: tuple[Part, ...]) -> Adapter | Composite:
        """Several adapters for one request (composition.check_parts' tuple): each acquired, and their
        Composite built once per distinct combination; the caller must `release` what it gets.

        Members all resident are taken at once. Else requests acquire their members one request at a
        time: a request holding some of its members while it waits for a slot for the next holds them
        until requests that run release theirs, but two such requests each holding slots the other
        waits for would wait each other out. The whole wait, for its turn too, is ACQUIRE_TIMEOUT_S."""
        if self.max_resident and len(parts) > self.max_resident:  # they could never be resident at once
            raise InvalidRequestError(f"adapters: expected at most {self.max_resident} adapters in one request "
                                      f"(--max-resident-adapters), got {len(parts)}")
        held: list[Adapter] = []
        try:
            held = self._take_resident([p.name for p in parts]) or await self._acquire_in_turn(parts)
            if len(parts) == 1 and parts[0].weight == 1.0:
                return held[0]
            return await self._composite(held, [p.weight for p in parts])
        except BaseException:
            for adapter in held:
                self.release(adapter)
            raise

    def _take_resident(self, names: list[str]) -> list[Adapter] | None:
        """Each named adapter, one more user each, if all are resident (and current: not with a shared
        store, whose manifests `acquire` reads again); else None and nothing taken."""
        with self._lock:
            entries = [self._entries.get(name) for name in names]
            if self.shared or not all(e is not None and e.adapter is not None for e in entries):
                return None
            return [self._take(e) for e in entries]

    async def _acquire_in_turn(self, parts: tuple[Part, ...]) -> list[Adapter]:
        """Each member acquired, one request at a time (one member waits holding nothing: no turn),
        within ACQUIRE_TIMEOUT_S of now."""
        if len(parts) == 1:
            return [await self.acquire(parts[0].name)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACQUIRE_TIMEOUT_S
        held: list[Adapter] = []
        try:
            async with asyncio.timeout_at(deadline):
                await self._combining.acquire()
        except TimeoutError as exc:
            raise AdapterCapacityError(f"adapters: no turn to acquire {len(parts)} adapters within "
                                       f"{ACQUIRE_TIMEOUT_S:.0f}s (other requests combining adapters wait for "
                                       "slots); retry later", retry_after_s=1) from exc
        try:
            for part in parts:
                held.append(await self.acquire(part.name, deadline))
        except BaseException:
            for adapter in held:
                self.release(adapter)
            raise
        finally:
            self._combining.release()
        return held

    async def _composite(self, held: list[Adapter], weights: list[float]) -> Composite:
        key = Composites.key(held, weights)
        with self._lock:
            found = self._composites.get(key)
        if found is not None:
            return found
        built = await asyncio.to_thread(self.on_engine, lambda: compose(held, weights))
        with self._lock:
            if any(self._resident.get(a.name) is not a for a in held):
                return built  # a member left residency meanwhile: serve this request, keep nothing
            kept = self._composites.put(key, built, self._composite_budget())
        self._publish()
        return kept

    def share(self, adapter: Adapter | Composite) -> None:
        """One more use of an adapter the caller holds (another choice of its request); `release` each."""
        with self._lock:
            for member in adapter.members if isinstance(adapter, Composite) else (adapter,):
                member.users += 1

    def release(self, adapter: Adapter | Composite) -> None:
        """A request holding `adapter` (or a Composite: each of its members) ended (any thread)."""
        if isinstance(adapter, Composite):
            for member in adapter.members:
                self.release(member)
            return
        freed = False
        with self._lock:
            adapter.users -= 1
            if adapter.users > 0:
                return
            freed = self._orphans.pop(id(adapter), None) is not None
        if freed:
            self._publish()
        self._wake_soon()

    def _take(self, entry: Entry) -> Adapter:
        """Under the lock: one more user, most recently used."""
        adapter = entry.adapter
        assert adapter is not None
        adapter.users += 1
        self._resident.move_to_end(entry.name)
        return adapter

    # ---- residency -------------------------------------------------------------------

    async def _load(self, entry: Entry, deadline: float) -> None:
        try:
            t0 = time.perf_counter()
            try:
                adapter = await asyncio.to_thread(self._read, entry)
            except HotswapError:
                raise
            except Exception as exc:
                raise AdapterLoadError(f"adapter {entry.name!r}: reading it from the store failed: "
                                       f"{type(exc).__name__}: {strip_paths(str(exc))}") from exc
            self.metrics.adapter_loaded(entry.kind, time.perf_counter() - t0)
            await self._admit(entry, adapter, deadline)
        finally:
            entry.loading = None

    def _read(self, entry: Entry) -> Adapter:
        """Worker thread: check the files against the manifest, load, place on the device."""
        self.store.verify(entry.name, entry.manifest)
        with self._model_lock:
            kind, draft = read_adapter(entry.folder, self.base)
        if kind != entry.kind:
            raise StoreCorruptError(f"store adapter {entry.name}: expected kind {entry.kind}, got {kind}")
        weights = self.on_engine(lambda: complete(draft, self.base).to(self.base.device, self.base.dtype))
        return Adapter(entry.name, kind, weights, entry.default_mode, entry.manifest.get("source", ""),
                       entry.created_at)

    async def _admit(self, entry: Entry, adapter: Adapter, deadline: float) -> None:
        """Make room (evicting least recently used, unheld, unpinned adapters) and seat `adapter`."""
        need = adapter.size_bytes
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._entries.get(entry.name) is not entry or entry.waiting == 0:
                    return  # deleted or replaced while loading, or its requests left: drop what was loaded
                self._check_fits(entry, need)
                victims = self._victims(need)
                if victims is not None:
                    for name in victims:
                        self._entries[name].adapter = None
                        self._composites.forget(self._resident.pop(name))
                    entry.adapter = adapter
                    self._resident[entry.name] = adapter
                    self._composites.trim(self._composite_budget())
                    self.peak_resident = max(self.peak_resident, len(self._resident) + len(self._orphans))
                    break
                waiter = loop.create_future()
                self._waiters.append(waiter)
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(waiter, max(remaining, 0))
            except TimeoutError as exc:
                raise AdapterCapacityError(
                    f"adapter {entry.name!r}: no resident slot freed within {ACQUIRE_TIMEOUT_S:.0f}s "
                    f"({self.max_resident} slots, all pinned or in use); retry later", retry_after_s=1) from exc
        if victims:
            self.metrics.evicted(len(victims))
        self._publish()

    def _composite_budget(self) -> int | None:
        """Under the lock: the bytes of --max-adapter-memory-bytes that resident adapters leave to the
        combinations kept for reuse (None: unbounded). Adapters come first: a seated one trims them."""
        if not self.max_memory_bytes:
            return None
        return self.max_memory_bytes - sum(a.size_bytes for a in self._live())

    def _live(self) -> list[Adapter]:
        """Under the lock: every adapter on the device, resident or held by requests after it left."""
        return [*self._resident.values(), *self._orphans.values()]

    def _check_fits(self, entry: Entry, need: int) -> None:
        """Under the lock: refuse at once what could never fit, whatever is released."""
        if self.max_memory_bytes and need > self.max_memory_bytes:
            raise AdapterCapacityError(f"adapter {entry.name!r} needs {need} bytes on the device; "
                                       f"--max-adapter-memory-bytes is {self.max_memory_bytes}")
        if entry.pinned:
            return
        pinned = [a for n, a in self._resident.items() if self._entries[n].pinned]
        if self.max_resident and len(pinned) >= self.max_resident:
            raise AdapterCapacityError(f"adapter {entry.name!r}: all {self.max_resident} resident slots are pinned")
        if self.max_memory_bytes and sum(a.size_bytes for a in pinned) + need > self.max_memory_bytes:
            raise AdapterCapacityError(f"adapter {entry.name!r}: pinned adapters leave less than {need} bytes "
                                       f"of --max-adapter-memory-bytes {self.max_memory_bytes}")

    def _victims(self, need: int) -> list[str] | None:
        """Under the lock: the fewest least-recently-used evictable names that make room, or None."""
        live = self._live()
        count, used = len(live), sum(a.size_bytes for a in live)
        victims: list[str] = []
        for name, adapter in self._resident.items():
            if self._fits(count, used, need):
                break
            entry = self._entries[name]
            if adapter.users == 0 and not entry.pinned and entry.waiting == 0:
                victims.append(name)
                count, used = count - 1, used - adapter.size_bytes
        return victims if self._fits(count, used, need) else None

    def _fits(self, count: int, used: int, need: int) -> bool:
        return ((not self.max_resident or count + 1 <= self.max_resident)
                and (not self.max_memory_bytes or used + need <= self.max_memory_bytes))

    def _unseat(self, entry: Entry) -> None:
        """Under the lock: `entry` is no longer registered; its adapter lives on while requests hold it."""
        adapter, entry.adapter = entry.adapter, None
        if adapter is not None:
            self._composites.forget(adapter)
            if self._resident.get(entry.name) is adapter:
                del self._resident[entry.name]
            if adapter.users > 0:
                self._orphans[id(adapter)] = adapter

    def _wake_soon(self) -> None:
        """From any thread: let waiting admissions look again."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass

    def _settle(self, name: str) -> None:
        """Worker thread: wait for a store write in progress (it holds `_admin`); shared: read `name` again."""
        if self.shared:
            self.sync(name)
            return
        with self._admin:
            pass

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _device_bytes(self, fp32_bytes: int) -> int:
        return fp32_bytes * self.base.dtype.itemsize // 4

    def slot_waits(self) -> dict[str, int]:
        """The adapters requests are waiting to have resident (loading, or for a slot): name -> requests."""
        with self._lock:
            return {e.name: e.waiting for e in self._entries.values() if e.waiting > 0}

    def resident_count(self) -> int:
        with self._lock:
            return len(self._resident) + len(self._orphans)

    def _publish(self) -> None:
        with self._lock:
            registered = Counter(e.kind for e in self._entries.values())
            live = self._live()
            combined = self._composites.size_bytes
        resident = Counter(a.kind for a in live)
        for kind in ADAPTER_KINDS:
            self.metrics.set_registered(kind, registered[kind])
            self.metrics.set_resident(kind, resident[kind])
        self.metrics.set_adapter_memory(str(self.base.device), sum(a.size_bytes for a in live) + combined)


def _same_version(held: dict, stored: dict) -> bool:
    return held.get("created_at") == stored.get("created_at") and held.get("status") == stored.get("status")


def _corrupt_error(name: str, reason: str) -> StoreCorruptError:
    return StoreCorruptError(f"adapter {name!r} is corrupt in the store ({reason}); it is not served: delete it, "
                             "or upload it again with replace=true")


def _untrusted(fn, *args):
    """Run a reader over uploaded files: any failure that is not already typed is the files' fault (422)."""
    try:
        return fn(*args)
    except (HotswapError, OSError):  # typed already, or the server's own disk
        raise
    except Exception as exc:
        log.warning("adapter files refused: %s: %s", type(exc).__name__, exc, exc_info=True)
        raise AdapterFormatError("files", "adapter files these loaders can read",
                                 f"{type(exc).__name__}: {strip_paths(str(exc))}") from exc
