"""Two servers on one store folder (`--shared-store`, as the cluster's replicas run): each sees the other's writes."""
from __future__ import annotations

import os
import time

import httpx
import pytest

from server.adapters.registry import Registry
from server.app import _import_examples
from server.metrics import Metrics
from server.model import load_base_model
from server.store import Store
from tests.conftest import LLAMA, live_server, references
from tests.store.helpers import LORA, LORA_ALL, PROMPT, folder_files, upload

PROMPT_IDS = references("peft", "tiny-llama")["prompts"][0]


@pytest.fixture
def pair(tmp_path):
    store = tmp_path / "store"
    with live_server(tmp_path / "a", model=LLAMA, store=store, shared_store=True) as a, \
            live_server(tmp_path / "b", model=LLAMA, store=store, shared_store=True) as b:
        yield httpx.Client(base_url=a.url, timeout=60), httpx.Client(base_url=b.url, timeout=60)


def _tokens(client: httpx.Client, adapter: str) -> httpx.Response:
    return client.post("/generate", params={"adapter": adapter},
                       json={"prompt_token_ids": PROMPT_IDS, "max_new_tokens": 12})


def _expected(name: str) -> list[int]:
    return references("peft", "tiny-llama")["adapters"][name]["outputs"][0]


def test_upload_through_one_is_listed_and_served_by_the_other(pair):
    a, b = pair
    assert upload(a, "x", files=folder_files(LORA)).status_code == 201
    assert [m["id"] for m in b.get("/v1/models").json()["data"]][1:] == ["x"]
    assert b.get("/adapters/x").status_code == 200
    assert _tokens(b, "x").json()["token_ids"] == _expected("lora-qv-r8")


def test_delete_and_replace_through_one_reach_the_other_at_once(pair):
    a, b = pair
    assert upload(a, "x", files=folder_files(LORA)).status_code == 201
    assert _tokens(b, "x").json()["token_ids"] == _expected("lora-qv-r8")  # resident on b now
    assert upload(a, "x", files=folder_files(LORA_ALL), replace=True).status_code == 201
    assert _tokens(b, "x").json()["token_ids"] == _expected("lora-all-r16")
    assert a.delete("/adapters/x").status_code == 200
    assert _tokens(b, "x").status_code == 404
    assert b.get("/adapters").json()["adapters"] == []


def test_same_name_uploaded_through_both_keeps_the_first(pair):
    a, b = pair
    assert upload(a, "x", files=folder_files(PROMPT)).status_code == 201
    second = upload(b, "x", files=folder_files(LORA))
    assert second.status_code == 409, second.text
    assert _tokens(b, "x").json()["kind"] == "prompt"


def test_start_up_leaves_another_servers_young_upload_alone(tmp_path):
    store = tmp_path / "store"
    with live_server(tmp_path / "a", model=LLAMA, store=store, shared_store=True):
        young, old = store / ".tmp-young", store / ".tmp-old"
        young.mkdir()
        old.mkdir()
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        with live_server(tmp_path / "b", model=LLAMA, store=store, shared_store=True):
            assert young.exists() and not old.exists()


def test_the_other_servers_gauges_follow_without_a_request(tmp_path):
    store = tmp_path / "store"
    with live_server(tmp_path / "a", model=LLAMA, store=store, shared_store=True) as a, \
            live_server(tmp_path / "b", model=LLAMA, store=store, shared_store=True, store_poll_s=0.2) as b:
        assert upload(httpx.Client(base_url=a.url, timeout=60), "x", files=folder_files(PROMPT)).status_code == 201
        deadline = time.monotonic() + 10
        while 'hotswap_adapters_registered{kind="prompt"} 1.0' not in httpx.get(f"{b.url}/metrics").text:
            assert time.monotonic() < deadline, "b never took in the upload"
            time.sleep(0.1)


def test_a_pin_through_one_loads_the_adapter_on_the_other(tmp_path):
    store = tmp_path / "store"
    with live_server(tmp_path / "a", model=LLAMA, store=store, shared_store=True) as a, \
            live_server(tmp_path / "b", model=LLAMA, store=store, shared_store=True, store_poll_s=0.2) as b:
        client = httpx.Client(base_url=a.url, timeout=60)
        assert upload(client, "x", files=folder_files(LORA)).status_code == 201
        assert client.post("/adapters/x/pin").json()["resident"] is True
        deadline = time.monotonic() + 10
        while not httpx.get(f"{b.url}/adapters/x").json()["resident"]:
            assert time.monotonic() < deadline, "b never loaded the adapter a pinned"
            time.sleep(0.1)
        assert httpx.get(f"{b.url}/adapters/x").json()["pinned"] is True


def test_a_replica_that_loses_the_race_to_import_the_examples_skips_them(tmp_path):
    """Two replicas with the embedded model start on a new shared store: both import examples/."""
    base = load_base_model(None)
    first, second = (Registry(base, Metrics(), Store(tmp_path / "store"), shared=True) for _ in range(2))
    first.open()
    second.open()
    _import_examples(first)
    _import_examples(second)  # its registry had not seen them: each commit finds the name taken
    second.sync()
    assert [e.name for e in second.all()] == ["docstring-lora", "prose-bottleneck", "unittest-prompt"]
