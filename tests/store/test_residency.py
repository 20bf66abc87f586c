"""Residency: bounded LRU with pinning, load on first use (once), never evict what a request holds."""
from __future__ import annotations

import asyncio
import shutil

import pytest

from server.adapters import registry as registry_module
from server.adapters.registry import Registry
from server.errors import AdapterCapacityError
from server.errors import AdapterNotFoundError
from server.metrics import Metrics
from server.model import load_base_model
from server.store import Store, StoreCorruptError
from tests.conftest import LLAMA
from tests.store.helpers import PROMPT

NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def base():
    return load_base_model(LLAMA, "cpu", "float32")


@pytest.fixture(scope="module")
def seeded(base, tmp_path_factory):
    """A store holding four copies of a small soft prompt."""
    root = tmp_path_factory.mktemp("seeded")
    reg = Registry(base, Metrics(), Store(root))
    reg.open()
    for name in NAMES:
        reg.import_folder(name, PROMPT, source="test")
    return root


@pytest.fixture
def reg(base, seeded, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(seeded, root)
    r = Registry(base, Metrics(), Store(root), max_resident=2)
    r.open()
    return r


def resident(reg: Registry) -> list[str]:
    return [e.name for e in reg.all() if e.adapter is not None]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_registered_hold_no_tensors_until_used(reg):
    assert [e.name for e in reg.all()] == list(NAMES) and resident(reg) == []

    async def use():
        adapter = await reg.acquire("a")
        assert adapter.weights.embeddings.shape == (16, 256) and adapter.users == 1
        reg.release(adapter)

    run(use())
    assert resident(reg) == ["a"] and reg.get("a").record()["resident"] is True


def test_lru_eviction_order(reg):
    async def use(*names):
        for name in names:
            reg.release(await reg.acquire(name))

    run(use("a", "b", "a", "c"))  # b is the least recently used when c arrives
    assert resident(reg) == ["a", "c"]
    assert reg.metrics.evictions._value.get() == 1
    assert reg.peak_resident == 2


def test_held_adapter_never_evicted_and_waiter_admitted_after_release(reg):
    async def scenario():
        held_a = await reg.acquire("a")
        held_b = await reg.acquire("b")
        waiting = asyncio.ensure_future(reg.acquire("c"))  # no slot: both residents are held
        await asyncio.sleep(0.3)
        assert not waiting.done() and resident(reg) == ["a", "b"]
        reg.release(held_b)
        held_c = await waiting
        assert resident(reg) == ["a", "c"] and held_a.users == 1
        reg.release(held_a)
        reg.release(held_c)

    run(scenario())
    assert reg.peak_resident == 2


def test_a_request_that_leaves_while_waiting_for_a_slot_loads_nothing_and_evicts_nothing(reg):
    async def scenario():
        held = [await reg.acquire("a"), await reg.acquire("b")]
        leaver = asyncio.ensure_future(reg.acquire("c"))  # no slot: both residents are held
        await asyncio.sleep(0.3)
        leaver.cancel()  # its client left
        await asyncio.sleep(0.1)
        for adapter in held:
            reg.release(adapter)
        await asyncio.sleep(0.3)
        assert reg.get("c").loading is None

    run(scenario())
    assert resident(reg) == ["a", "b"] and reg.metrics.evictions._value.get() == 0


def test_concurrent_first_uses_load_once(reg, monkeypatch):
    calls = []
    real = reg._read
    monkeypatch.setattr(reg, "_read", lambda entry: calls.append(entry.name) or real(entry))

    async def many():
        adapters = await asyncio.gather(*(reg.acquire("a") for _ in range(10)))
        assert len({id(a) for a in adapters}) == 1 and adapters[0].users == 10
        for a in adapters:
            reg.release(a)

    run(many())
    assert calls == ["a"]


def test_pinned_stays_resident(reg):
    async def scenario():
        await reg.pin("a")
        for name in ("b", "c", "d", "b", "c"):
            reg.release(await reg.acquire(name))
        assert "a" in resident(reg)
        await reg.pin("b")
        with pytest.raises(AdapterCapacityError, match="pinned"):
            await reg.acquire("c")  # every slot pinned: refused at once, not after a timeout
        await reg.pin("b", False)
        reg.release(await reg.acquire("c"))

    run(scenario())
    assert reg.get("a").pinned and not reg.get("b").pinned


def test_pins_survive_reopen(base, reg):
    run(reg.pin("c"))
    again = Registry(base, Metrics(), reg.store, max_resident=2)
    again.open()
    run(again.load_pinned())
    assert resident(again) == ["c"] and again.get("c").record()["pinned"] is True


def test_times_out_when_every_slot_is_held(reg, monkeypatch):
    monkeypatch.setattr(registry_module, "ACQUIRE_TIMEOUT_S", 0.3)

    async def scenario():
        held = [await reg.acquire("a"), await reg.acquire("b")]
        with pytest.raises(AdapterCapacityError, match="no resident slot"):
            await reg.acquire("c")
        for a in held:
            reg.release(a)
        reg.release(await reg.acquire("c"))

    run(scenario())


def test_delete_while_held_keeps_old_weights_until_release(reg):
    async def scenario():
        held = await reg.acquire("a")
        await asyncio.to_thread(reg.unregister, "a")
        with pytest.raises(AdapterNotFoundError):
            await reg.acquire("a")
        assert held.weights.embeddings.shape == (16, 256)
        assert reg.resident_count() == 1  # the orphan still counts against the bound
        reg.release(held)
        assert reg.resident_count() == 0

    run(scenario())


def test_failed_load_evicts_nothing(reg):
    async def fill():
        for name in ("a", "b"):
            reg.release(await reg.acquire(name))

    run(fill())
    (reg.store.root / "c" / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(StoreCorruptError, match="sha256"):
        run(reg.acquire("c"))
    assert resident(reg) == ["a", "b"] and reg.metrics.evictions._value.get() == 0


def test_memory_bound(base, seeded, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(seeded, root)
    one = 16 * 256 * 4  # a soft prompt's bytes on the device
    reg = Registry(base, Metrics(), Store(root), max_resident=0, max_memory_bytes=2 * one)
    reg.open()

    async def use(*names):
        for name in names:
            reg.release(await reg.acquire(name))

    run(use("a", "b", "c", "d"))
    assert resident(reg) == ["c", "d"] and reg.peak_resident == 2
