"""Back-pressure, cancellation on disconnect and graceful shutdown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.adapters import registry as registry_module
from tests.conftest import FIXTURES, LLAMA, free_port, live_server, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def test_full_queue_answers_429(tmp_path):
    with live_server(tmp_path, model=LLAMA, max_batch_size=1, max_waiting=2) as srv:
        def call(_):
            with srv.client() as c:
                return c.post("/generate", json={"prompt_token_ids": [5, 6], "max_new_tokens": 60, "ignore_eos": True})

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(call, range(12)))
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["type"] == "queue_full"
        assert srv.generate(prompt_token_ids=[5], max_new_tokens=3)["usage"]["completion_tokens"] >= 1
        with srv.client() as c:  # the overload shows on the dashboard: each 429 counted as rejected
            metrics = c.get("/metrics").text
        assert _metric(metrics, "hotswap_requests_total", status="rejected") == codes.count(429)


def test_a_request_of_several_choices_is_queued_whole_or_refused_whole(tmp_path):
    """One row decoding, one request waiting, --max-waiting 3: three choices do not fit, so none is
    queued (none decodes for nobody, none counts as cancelled), and the 429 counts only the others."""
    with live_server(tmp_path, model=LLAMA, max_batch_size=1, max_waiting=3) as srv, srv.client() as c:
        engine = srv.app.state.engine

        def waits(body: dict) -> threading.Thread:
            def post() -> None:
                with srv.client() as own:
                    outcomes.append(own.post("/v1/completions", json=body))

            thread = threading.Thread(target=post)
            thread.start()
            return thread

        def until(ok) -> None:
            deadline = time.monotonic() + 30
            while not ok() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ok()

        outcomes: list[httpx.Response] = []
        completion = {"model": "tiny-llama", "prompt": [5, 6], "max_tokens": 2}
        body = {"prompt_token_ids": [5, 6], "max_new_tokens": 2000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the only row decodes
            first = waits(completion)
            until(lambda: engine.waiting == 1)
            before = c.get("/metrics").text
            refused = c.post("/v1/completions", json={**completion, "n": 3})
            after = c.get("/metrics").text
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["message"].startswith("queue is full (1 requests waiting)")
            assert engine.waiting == 1
            for status, moved in (("rejected", 3), ("cancelled", 0)):
                assert _metric(after, "hotswap_requests_total", status=status) - _metric(
                    before, "hotswap_requests_total", status=status) == moved, status
            second = waits({**completion, "n": 2})  # fits: both its choices wait
            until(lambda: engine.waiting == 3)
        first.join(60)
        second.join(60)
    assert [r.status_code for r in outcomes] == [200, 200]
    assert sorted(len(r.json()["choices"]) for r in outcomes) == [1, 2]


def test_no_free_adapter_slot_answers_503_with_retry_after_only_while_slots_are_in_use(tmp_path, monkeypatch):
    """One slot: held by a stream, a second adapter waits for it, times out and may retry; pinned,
    it never frees by waiting, so no Retry-After is promised."""
    monkeypatch.setattr(registry_module, "ACQUIRE_TIMEOUT_S", 0.2)
    peft = FIXTURES / "peft" / "tiny-llama"
    adapters = [f"qv={peft / 'lora-qv-r8'}", f"all={peft / 'lora-all-r16'}"]
    with live_server(tmp_path, model=LLAMA, adapter=adapters, max_resident_adapters=1) as srv, srv.client() as c:
        body = {"prompt_token_ids": [5, 6], "max_new_tokens": 2000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/generate?adapter=qv", json=body) as r:
            lines = r.iter_lines()  # kept: a closed iterator closes the stream, which cancels it
            assert next(lines).startswith("data: ")
            busy = c.post("/generate?adapter=all", json={"prompt": "hi", "max_new_tokens": 2})
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "adapter_capacity"
        assert busy.headers["retry-after"] == "1"
        assert c.post("/adapters/qv/pin").status_code == 200
        pinned = c.post("/generate?adapter=all", json={"prompt": "hi", "max_new_tokens": 2})
        assert pinned.status_code == 503 and "pinned" in pinned.json()["error"]["message"]
        assert "retry-after" not in pinned.headers
        assert srv.generate(adapter="qv", prompt="hi", max_new_tokens=2)["usage"]["completion_tokens"] == 2


def test_disconnect_cancels_and_frees_row(tmp_path):
    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        body = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 2000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert got
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = c.get("/metrics").text
            if _metric(text, "hotswap_requests_running") == 0 and _metric(
                text, "hotswap_requests_total", status="cancelled"
            ) >= 1:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the disconnected request kept running")
        assert srv.generate(prompt_token_ids=[5], max_new_tokens=3)["usage"]["completion_tokens"] >= 1



def _wait_for_metrics(c: httpx.Client, what: str, ok) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ok(c.get("/metrics").text):
            return
        time.sleep(0.05)
    raise AssertionError(what)


def _give_up(srv, path: str, body: dict) -> None:
    """Send a request and leave before its answer comes (2,000 tokens take the tiny model over 0.5 s)."""
    try:
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=0.1)
    except httpx.TimeoutException:
        return
    raise AssertionError(f"{path} answered within 0.1 s: {r.status_code} {r.text[:300]}")


def test_a_client_gone_before_its_answer_cancels_its_request(tmp_path):
    """Not streamed, or streamed but still waiting for its first token: the request is cancelled, not
    decoded (or queued) to its end for nobody."""
    long = {"max_new_tokens": 2000, "ignore_eos": True}
    with live_server(tmp_path, model=LLAMA, max_batch_size=1) as srv, srv.client() as c:
        def cancelled(text: str) -> float:
            return _metric(text, "hotswap_requests_total", status="cancelled")

        _give_up(srv, "/generate", {"prompt_token_ids": [5, 6, 7], **long})
        _give_up(srv, "/v1/completions", {"model": "tiny-llama", "prompt": [5, 6], "max_tokens": 2000,
                                          "ignore_eos": True})
        _wait_for_metrics(c, "the abandoned requests kept running", lambda text: cancelled(text) == 2 and _metric(
            text, "hotswap_requests_running") == 0)
        with c.stream("POST", "/generate", json={"prompt_token_ids": [5, 6], **long, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")  # it holds the one row
            _give_up(srv, "/generate", {"prompt_token_ids": [8, 9], **long, "stream": True})  # queued behind it
            _wait_for_metrics(c, "the abandoned stream stayed queued", lambda text: cancelled(text) == 3)
        assert srv.generate(prompt_token_ids=[5], max_new_tokens=3)["usage"]["completion_tokens"] == 3


def test_sigterm_finishes_in_flight_and_exits_zero(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(LLAMA), "--port", str(port), "--store", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, lambda: proc.poll() is None)
        result: dict = {}
        started = threading.Event()

        def long_request():
            body = {"prompt_token_ids": [5, 6], "max_new_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        started.set()
                result["status"], result["final"] = r.status_code, events[-1]

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert result["status"] == 200
        assert result["final"]["finish_reason"] == "length"
        assert len(result["final"]["token_ids"]) == 400
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def slow_two_slots(tmp_path, monkeypatch):
    """A server with two resident slots and four LoRAs (qv1, qv2, all1, all2) that load and combine
    slowly enough for requests to interleave; the acquire timeout 5 s."""
    monkeypatch.setattr(registry_module, "ACQUIRE_TIMEOUT_S", 5.0)
    read, compose = registry_module.Registry._read, registry_module.compose
    monkeypatch.setattr(registry_module.Registry, "_read", lambda self, entry: time.sleep(0.5) or read(self, entry))
    monkeypatch.setattr(registry_module, "compose", lambda *args: time.sleep(1.0) or compose(*args))
    peft = FIXTURES / "peft" / "tiny-llama"
    adapters = [f"qv{i}={peft / 'lora-qv-r8'}" for i in (1, 2)] + [f"all{i}={peft / 'lora-all-r16'}" for i in (1, 2)]
    with live_server(tmp_path, model=LLAMA, adapter=adapters, max_resident_adapters=2) as srv:
        yield srv


def _pair(i: int) -> list[dict]:
    return [{"name": f"qv{i}", "weight": 0.5}, {"name": f"all{i}", "weight": 0.5}]


def test_two_combinations_that_together_need_more_slots_than_there_are_both_run(slow_two_slots):
    """Two requests each combining two adapters of their own: each holding one member while it waited
    for a slot for its second would have held the other's slot until the acquire timeout; one at a
    time, both are served."""
    def combined(i: int) -> httpx.Response:
        with slow_two_slots.client() as c:
            return c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "adapters": _pair(i)})

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(combined, (1, 2)))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]


def test_a_combination_with_several_choices_takes_its_slots_once(slow_two_slots):
    """Two prompts over one combination, and a second combination arriving while the first is being
    combined: the first request's second choice shares what its first holds (waiting for a turn it
    would have waited behind the second request, which waits for the first's slots)."""
    def batch() -> httpx.Response:
        with slow_two_slots.client() as c:
            return c.post("/v1/completions", json={"model": "tiny-llama", "prompt": ["hi", "yo"], "max_tokens": 2,
                                                   "adapters": _pair(1)})

    def other() -> httpx.Response:
        time.sleep(1.3)  # the first has loaded its two members and is combining them
        with slow_two_slots.client() as c:
            return c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "adapters": _pair(2)})

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(batch), pool.submit(other)
        responses = [first.result(), second.result()]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
