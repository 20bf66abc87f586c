"""Adapters across restarts, under load while deleted or replaced, and at scale (1,000 registered, 8 resident)."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from server.adapters.registry import Registry
from server.metrics import Metrics
from server.model import load_base_model
from server.store import Store
from tests.conftest import LLAMA, live_server, references
from tests.store.helpers import (
    BN_BIN,
    BN_ST,
    LORA,
    LORA_ALL,
    PROMPT,
    folder_files,
    outputs,
    targz_bytes,
    upload,
    zip_bytes,
)

PEFT = references("peft", "tiny-llama")
HUB = references("adapterhub", "tiny-llama")


def _metric(text: str, name: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


def test_restart_keeps_adapters_and_outputs(tmp_path):
    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        assert upload(c, "l", files=folder_files(LORA)).status_code == 201
        assert upload(c, "p", archive=zip_bytes(folder_files(PROMPT))).status_code == 201
        assert upload(c, "b", archive=targz_bytes(folder_files(BN_BIN), top="seq_bn")).status_code == 201
        assert c.post("/adapters/p/pin").status_code == 200
        before = {n: outputs(srv, n, PEFT["prompts"]) for n in ("l", "p", "b")}
        records = c.get("/adapters").json()["adapters"]
    assert before["p"] == PEFT["adapters"]["prompt-16"]["outputs"]
    assert before["b"] == HUB["adapters"]["seq_bn-rf16"]["outputs"]

    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        again = c.get("/adapters").json()["adapters"]
        keys = ("name", "kind", "default_mode", "size_bytes", "created_at", "files", "pinned")
        assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in records]
        assert [r["resident"] for r in again] == [False, False, True]  # b, l, p: only the pinned p loaded at start
        assert {n: outputs(srv, n, PEFT["prompts"]) for n in ("l", "p", "b")} == before
        assert outputs(srv, "l", PEFT["prompts"], mode="merged") == PEFT["adapters"]["lora-qv-r8"]["outputs"]


def _streams(srv, adapters: list[str], body: dict) -> tuple[list[threading.Thread], list]:
    """One streaming request per adapter name, each in its thread, all decoding when this returns;
    results[i] becomes (status, its last event, when it ended) once its thread ends."""
    started, results = [threading.Event() for _ in adapters], [None] * len(adapters)

    def stream(i: int) -> None:
        with srv.client() as c, c.stream("POST", "/generate", params={"adapter": adapters[i]},
                                         json={**body, "stream": True}) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    started[i].set()
            results[i] = (r.status_code, events[-1], time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(adapters))]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    return threads, results


def test_delete_and_replace_while_16_requests_use_them(tmp_path):
    long = {"prompt_token_ids": PEFT["prompts"][0], "max_new_tokens": 160, "ignore_eos": True}
    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        for name in ("doomed", "swapped"):
            assert upload(c, name, files=folder_files(PROMPT)).status_code == 201
        old = srv.generate("swapped", **long)["token_ids"]
        threads, results = _streams(srv, ["doomed", "swapped"] * 8, long)
        assert [c.get(f"/adapters/{n}").json()["in_use"] for n in ("doomed", "swapped")] == [8, 8]

        assert c.delete("/adapters/doomed").status_code == 200
        r = upload(c, "swapped", files=folder_files(BN_ST), replace=True)
        assert r.status_code == 201 and r.json()["kind"] == "bottleneck"
        changed_at = time.monotonic()
        assert c.post("/generate", params={"adapter": "doomed"}, json={"prompt": "x"}).status_code == 404
        assert outputs(srv, "swapped", HUB["prompts"]) == HUB["adapters"]["seq_bn-rf4-st"]["outputs"]

        for t in threads:
            t.join(120)
        for status, final, done_at in results:
            assert status == 200 and final["finish_reason"] == "length"
            assert final["kind"] == "prompt" and final["token_ids"] == old  # the weights each started with
            assert done_at > changed_at  # they were running across the delete and the replace
        registry = srv.app.state.registry
        assert registry.resident_count() == 1  # the old versions went when their last request ended
        assert not (srv.app.state.settings.store / "doomed").exists()



def test_a_lora_replaced_while_merged_serves_its_new_weights_merged(tmp_path):
    """The old version stays merged for the requests that began with it; the new version's merged
    requests wait for their own merge instead of joining the old one's batch."""
    long = {"prompt_token_ids": PEFT["prompts"][0], "max_new_tokens": 400, "ignore_eos": True, "mode": "merged"}
    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        assert upload(c, "swapped", files=folder_files(LORA)).status_code == 201
        old = srv.generate("swapped", **long)["token_ids"]
        threads, results = _streams(srv, ["swapped"] * 4, long)
        assert upload(c, "swapped", files=folder_files(LORA_ALL), replace=True).status_code == 201
        asked_at = time.monotonic()
        assert outputs(srv, "swapped", PEFT["prompts"], mode="merged") == PEFT["adapters"]["lora-all-r16"]["outputs"]
        for t in threads:
            t.join(120)
        for status, final, done_at in results:
            assert status == 200 and final["token_ids"] == old  # the weights each started with, merged
            assert done_at > asked_at  # they were decoding merged when the new version was asked for


def _seed_thousand(store_root, n: int = 1000) -> list[str]:
    """One validated LoRA in the store, then copies of it (hard links and a fresh manifest each)."""
    reg = Registry(load_base_model(LLAMA, "cpu", "float32"), Metrics(), Store(store_root))
    reg.open()
    reg.import_folder("lora-0000", LORA, source="test")
    src = store_root / "lora-0000"
    manifest = json.loads((src / "manifest.json").read_text())
    names = [f"lora-{i:04d}" for i in range(n)]
    for name in names[1:]:
        dst = store_root / name
        dst.mkdir()
        for f in src.iterdir():
            if f.name != "manifest.json":
                os.link(f, dst / f.name)
        (dst / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return names


def test_thousand_registered_eight_resident(tmp_path):
    names = _seed_thousand(tmp_path / "store")
    with live_server(tmp_path, model=LLAMA, max_resident_adapters=8) as srv, srv.client() as c:
        assert len(c.get("/adapters").json()["adapters"]) == 1000
        registry = srv.app.state.registry
        assert registry.resident_count() == 0
        seen, stop = [], threading.Event()

        def watch() -> None:
            with srv.client() as w:
                while not stop.wait(0.02):
                    seen.append(_metric(w.get("/metrics").text, "hotswap_adapters_resident"))

        watcher = threading.Thread(target=watch)
        watcher.start()
        jobs = names[::1000 // 64][:64] + names[:16]  # round-robin over 64, then 16 evicted early come back

        def call(name: str) -> list[int]:
            return srv.generate(name, prompt_token_ids=PEFT["prompts"][1], max_new_tokens=4)["token_ids"]

        try:
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(call, jobs))
        finally:
            stop.set()
            watcher.join()
        assert got == [PEFT["adapters"]["lora-qv-r8"]["outputs"][1][:4]] * len(jobs)
        metrics = c.get("/metrics").text
        assert _metric(metrics, "hotswap_adapter_evictions_total") > 0
        assert _metric(metrics, "hotswap_adapters_registered") == 1000
        assert registry.peak_resident <= 8 and max(seen) <= 8 and registry.resident_count() <= 8


def test_store_folder_copies_are_cleaned(tmp_path):
    """Copies made by tests share files by hard link; deleting one leaves the others intact."""
    names = _seed_thousand(tmp_path / "store", n=3)
    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        assert c.delete(f"/adapters/{names[1]}").status_code == 200
        assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == [names[0], names[2]]
        assert outputs(srv, names[2], PEFT["prompts"], mode="merged") == PEFT["adapters"]["lora-qv-r8"]["outputs"]
    shutil.rmtree(tmp_path / "store")
