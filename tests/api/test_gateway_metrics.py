"""GET /metrics of a live server carries the Gateway API Inference Extension's vllm:* series, and they
move with the engine: rows running, requests queued behind a full batch, their adapters, KV usage."""
from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FIXTURES, LLAMA, LiveServer, live_server

PEFT = FIXTURES / "peft" / "tiny-llama"
MAX_BATCH_TOKENS = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    adapters = [f"lora={PEFT / 'lora-qv-r8'}", f"soft={PEFT / 'prompt-16'}"]
    with live_server(tmp_path_factory.mktemp("gateway"), model=LLAMA, adapter=adapters, max_batch_size=2,
                     max_batch_tokens=MAX_BATCH_TOKENS, max_resident_adapters=4) as srv:
        yield srv


def _gateway(srv: LiveServer) -> dict[str, tuple[dict, float]]:
    with srv.client() as c:
        text = c.get("/metrics").text
    return {s.name: (s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("vllm:")}


def test_idle_server_reports_zeroes_and_max_lora(server):
    g = _gateway(server)
    assert g["vllm:num_requests_running"][1] == 0 and g["vllm:num_requests_waiting"][1] == 0
    assert g["vllm:kv_cache_usage_perc"][1] == 0
    labels, stamp = g["vllm:lora_requests_info"]
    assert labels["max_lora"] == "4" and labels["waiting_lora_adapters"] == ""
    assert abs(stamp - time.time()) < 5


def test_series_follow_a_busy_batch(server):
    """Two long rows fill the batch (lora and base); a soft-prompt request waits behind them."""
    bodies = [("lora", 300), (None, 300), ("soft", 5)]

    def run(job):
        adapter, n = job
        return server.generate(adapter, prompt_token_ids=[5, 6, 7], max_new_tokens=n, ignore_eos=True)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, bodies[0]), pool.submit(run, bodies[1])]
        busy = _wait_for(server, lambda g: g["vllm:num_requests_running"][1] == 2)
        futures.append(pool.submit(run, bodies[2]))
        queued = _wait_for(server, lambda g: g["vllm:num_requests_waiting"][1] >= 1)
        for f in futures:
            f.result()
    assert busy["vllm:kv_cache_usage_perc"][1] == pytest.approx(2 * (3 + 300) / MAX_BATCH_TOKENS)
    assert "lora" in busy["vllm:lora_requests_info"][0]["running_lora_adapters"].split(",")
    assert queued["vllm:lora_requests_info"][0]["waiting_lora_adapters"] == "soft"
    idle = _wait_for(server, lambda g: g["vllm:num_requests_running"][1] == 0)
    assert idle["vllm:kv_cache_usage_perc"][1] == 0


def test_a_request_waiting_for_an_adapter_slot_counts_as_waiting(tmp_path):
    """One resident slot, held by a long LoRA request: a soft-prompt request waits for it, before any queue."""
    adapters = [f"lora={PEFT / 'lora-qv-r8'}", f"soft={PEFT / 'prompt-16'}"]
    with live_server(tmp_path, model=LLAMA, adapter=adapters, max_resident_adapters=1) as srv, ThreadPoolExecutor(2) as pool:
        long = pool.submit(srv.generate, "lora", prompt_token_ids=[5, 6, 7], max_new_tokens=400, ignore_eos=True)
        _wait_for(srv, lambda g: g["vllm:num_requests_running"][1] == 1)
        short = pool.submit(srv.generate, "soft", prompt_token_ids=[5, 6, 7], max_new_tokens=2)
        waiting = _wait_for(srv, lambda g: g["vllm:num_requests_waiting"][1] == 1)
        assert waiting["vllm:lora_requests_info"][0]["waiting_lora_adapters"] == "soft"
        assert long.result()["usage"]["completion_tokens"] == 400 and short.result()["kind"] == "prompt"
        assert _gateway(srv)["vllm:num_requests_waiting"][1] == 0


def _wait_for(srv: LiveServer, ok, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        g = _gateway(srv)
        if ok(g):
            return g
        time.sleep(0.02)
    raise AssertionError(f"metrics never reached the state; last: {g}")
