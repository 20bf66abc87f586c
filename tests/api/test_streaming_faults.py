"""Streams fail like JSON requests: refusals before any header, errors after it as an SSE event,
and whatever the client does, the adapter is given back (`in_use` returns to 0)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FIXTURES, LLAMA, live_server

QV = FIXTURES / "peft" / "tiny-llama" / "lora-qv-r8"
LONG = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 1500, "ignore_eos": True}


def in_use(srv, name: str = "qv") -> int:
    with srv.client() as c:
        return c.get(f"/adapters/{name}").json()["in_use"]


def wait_until(predicate, timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s}s")


def sse(response: httpx.Response) -> Iterator[dict]:
    """The stream's data events; hold on to it: an abandoned line iterator closes the connection."""
    return (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One row, one waiting place: easy to fill."""
    with live_server(tmp_path_factory.mktemp("streams"), model=LLAMA, adapter=[f"qv={QV}"],
                     max_batch_size=1, max_waiting=1) as s:
        yield s


@pytest.mark.parametrize("path,body,status,type_", [
    ("/generate?adapter=nope", {"prompt": "hi", "stream": True}, 404, "adapter_not_found"),
    ("/generate", {"prompt": "\ud800", "stream": True}, 400, "invalid_request"),
    ("/generate?adapter=qv", {"prompt": "hi", "stream": True, "seed": 2**64, "temperature": 1}, 400, "invalid_request"),
    ("/generate?adapter=qv", {"prompt_token_ids": [5] * 2000, "max_new_tokens": 100, "stream": True}, 400,
     "invalid_request"),
])
def test_stream_refusals_are_json_before_any_header(srv, path, body, status, type_):
    raw = json.dumps(body)  # ASCII JSON: a lone surrogate travels as the escape "\ud800"
    with srv.client() as c, c.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        r.read()
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == type_
    assert in_use(srv) == 0


def test_full_queue_with_stream_is_429_before_any_header(srv):
    engine = srv.app.state.engine
    with srv.client() as c, c.stream("POST", "/generate", json={**LONG, "stream": True}) as running:
        events = sse(running)
        assert next(events)["token_id"] >= 0  # the one row is taken
        waiting = threading.Thread(target=lambda: srv.generate(prompt_token_ids=[5], max_new_tokens=2))
        waiting.start()
        wait_until(lambda: engine.waiting == 1, what="a request waiting")
        with srv.client() as c2, c2.stream("POST", "/generate?adapter=qv", json={"prompt": "hi", "stream": True}) as r:
            r.read()
        assert r.status_code == 429 and r.headers["content-type"] == "application/json"
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["type"] == "queue_full"
        assert in_use(srv) == 0
    waiting.join(60)  # leaving the running stream cancelled it; the waiting one ran
    assert not waiting.is_alive()


def test_client_gone_before_the_body_gives_the_adapter_back(srv):
    """The client leaves while the response head is being written, before the body starts (the
    window where an adapter acquired for a body that never ran stayed in use): driven as uvicorn
    drives the app (ASGI spec 2.3), in-process."""
    body = json.dumps({**LONG, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/generate", "raw_path": b"/generate",
             "query_string": b"adapter=qv", "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def drive() -> None:
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict:
            return next(messages, {"type": "http.disconnect"})

        async def send(message: dict) -> None:
            await asyncio.sleep(0.05)  # a slow socket: the disconnect is seen while the head is written

        await asyncio.wait_for(srv.app(scope, receive, send), 30)

    async def three_then_settle() -> None:  # one loop, alive until the engine has answered every request
        for _ in range(3):
            await drive()
        for _ in range(600):
            if srv.app.state.registry.get("qv").record()["in_use"] == 0 and srv.app.state.engine.running == 0:
                return
            await asyncio.sleep(0.05)

    asyncio.run(three_then_settle())
    assert in_use(srv) == 0 and srv.app.state.engine.running == 0
    assert srv.generate("qv", prompt_token_ids=[5], max_new_tokens=2)["usage"]["completion_tokens"] == 2


def test_past_the_shutdown_timeout_clients_get_503_not_a_plain_500(tmp_path):
    """Served as `python -m server` serves: JSON 503 for the waiting client, an SSE error event for the stream."""
    with live_server(tmp_path, as_main=True, model=LLAMA, adapter=[f"qv={QV}"], shutdown_timeout_s=1) as s:
        plain: dict = {}

        def non_stream():
            with httpx.Client(base_url=s.url, timeout=60) as c:
                plain["r"] = c.post("/generate?adapter=qv", json={**LONG, "max_new_tokens": 2000})

        caller = threading.Thread(target=non_stream)
        with httpx.Client(base_url=s.url, timeout=60) as c, c.stream("POST", "/generate?adapter=qv",
                                                                     json={**LONG, "stream": True}) as r:
            events = sse(r)
            assert next(events)["token_id"] >= 0
            caller.start()
            wait_until(lambda: s.app.state.engine.running == 2, what="both requests running")
            s.server.should_exit = True
            events = list(events)
        caller.join(30)
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["type"] == "shutting_down"
        assert "--shutdown-timeout-s" in plain["r"].json()["error"]["message"]
        assert r.status_code == 200 and events[-1]["error"]["type"] == "shutting_down"
        wait_until(lambda: s.app.state.registry.get("qv").record()["in_use"] == 0, what="in_use 0")


@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_is_answered_as_json_500(srv, monkeypatch, stream):
    async def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(srv.app.state.generation, "tokenize", broken)
    with srv.client() as c:
        r = c.post("/generate?adapter=qv", json={"prompt": "hi", "stream": stream})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "internal_error" and "RuntimeError" in r.json()["error"]["message"]
    assert in_use(srv) == 0


def test_a_request_waiting_for_an_adapter_slot_at_shutdown_gets_503_not_a_plain_500(tmp_path):
    """One slot, held past the shutdown by something the drain does not end (here the test itself,
    on the server's loop); a request for another adapter waits for it (up to 60 s) when the
    shutdown begins: past --shutdown-timeout-s it answers JSON 503 shutting_down, not uvicorn's 500."""
    adapters = [f"qv={QV}", f"other={QV}"]
    with live_server(tmp_path, as_main=True, model=LLAMA, adapter=adapters, max_resident_adapters=1,
                     shutdown_timeout_s=1) as s:
        registry = s.app.state.registry
        s.generate("qv", prompt="hi", max_new_tokens=1)  # the registry now knows the server's loop
        asyncio.run_coroutine_threadsafe(registry.acquire("qv"), registry._loop).result(10)
        waiting: dict = {}

        def for_other():
            with httpx.Client(base_url=s.url, timeout=60) as c:
                waiting["r"] = c.post("/generate?adapter=other", json={"prompt": "hi", "max_new_tokens": 2})

        caller = threading.Thread(target=for_other)
        caller.start()
        wait_until(lambda: registry.get("other").waiting == 1, what="a request waiting for a slot")
        s.server.should_exit = True
        caller.join(30)
        assert waiting["r"].status_code == 503 and waiting["r"].json()["error"]["type"] == "shutting_down"
