"""Chunked prefill: a prompt longer than one chunk is fed a chunk per decode step. Its output equals
one-shot prefill for every adapter kind, the streams already decoding keep getting tokens while it
prefills, and a fault or a disconnect during its chunks stays with it."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from server.engine.prefill import Prefiller
from tests.conftest import FIXTURES, LLAMA, live_server

PEFT = FIXTURES / "peft" / "tiny-llama"
HUB = FIXTURES / "adapterhub" / "tiny-llama"
ADAPTERS = [f"{n}={PEFT / n}" for n in ("lora-qv-r8", "lora-all-r16", "prompt-16")] + [f"seq_bn-rf16={HUB / 'seq_bn-rf16'}"]
CHUNK = 8
WAIT_S = 60


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(2, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("chunked"), model=LLAMA, adapter=ADAPTERS,
                     prefill_chunk_tokens=CHUNK, max_prefill_tokens=16) as srv:  # 16: the chunk with no row decoding
        yield srv


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("one-shot"), model=LLAMA, adapter=ADAPTERS,
                     prefill_chunk_tokens=4096, prefix_cache=False) as srv:
        yield srv


def _post(srv, adapter: str | None, body: dict) -> httpx.Response:
    with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
        return c.post("/generate", params={"adapter": adapter} if adapter else {}, json=body)


def _jobs() -> list[tuple[str | None, dict]]:
    """Long and short prompts over every kind and both LoRA modes."""
    kinds = [(None, {}), ("lora-qv-r8", {}), ("lora-all-r16", {"mode": "merged"}), ("lora-all-r16", {}),
             ("prompt-16", {}), ("seq_bn-rf16", {})]
    jobs = []
    for i, (adapter, extra) in enumerate(kinds):
        for n in (3, 45, 130):
            jobs.append((adapter, {"prompt_token_ids": _prompt(i * 10 + n, n), "max_new_tokens": 10,
                                   "ignore_eos": True, **extra}))
    return jobs


def test_chunked_equals_one_shot_alone_and_mixed(chunked, one_shot):
    jobs = _jobs()
    want = [_post(one_shot, *job).json()["token_ids"] for job in jobs]
    alone = [_post(chunked, *job).json()["token_ids"] for job in jobs]
    assert alone == want
    with ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(lambda job: _post(chunked, *job), jobs))
    assert [r.json()["token_ids"] for r in mixed] == want


def test_decoding_streams_go_on_while_a_long_prompt_prefills(chunked):
    """With chunks, the stream that was decoding gets tokens all through the long prefill."""
    long = {"prompt_token_ids": _prompt(1, 400), "max_new_tokens": 1, "ignore_eos": True}
    short = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 120, "ignore_eos": True, "stream": True}
    token_times: list[float] = []

    def stream() -> None:
        with httpx.Client(base_url=chunked.url, timeout=WAIT_S) as c:
            with c.stream("POST", "/generate", json=short) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and "token_id" in json.loads(line[6:]):
                        token_times.append(time.monotonic())

    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream)
        while len(token_times) < 3:
            time.sleep(0.01)
        sent = time.monotonic()
        assert _post(chunked, None, long).status_code == 200
        answered = time.monotonic()
        streaming.result(WAIT_S)
    during = [t for t in token_times if sent < t < answered]
    assert len(during) >= 400 // CHUNK // 3, f"{len(during)} tokens streamed during a {400 // CHUNK}-chunk prefill"


def test_a_fault_in_a_chunk_fails_only_that_request(chunked, one_shot, monkeypatch):
    real = Prefiller.prefill_chunk

    def prefill_chunk(self, req, start, x):
        if req.params.seed == 99 and start >= 2 * CHUNK:
            raise RuntimeError("injected chunk fault")
        return real(self, req, start, x)

    monkeypatch.setattr(Prefiller, "prefill_chunk", prefill_chunk)
    jobs = _jobs()
    want = [_post(one_shot, *job).json()["token_ids"] for job in jobs]
    faulty = (None, {"prompt_token_ids": _prompt(7, 60), "max_new_tokens": 4, "seed": 99})
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        answers = list(pool.map(lambda job: _post(chunked, *job), [faulty, *jobs]))
    assert answers[0].status_code == 500 and "injected chunk fault" in answers[0].json()["error"]["message"]
    assert [r.json()["token_ids"] for r in answers[1:]] == want


def test_disconnect_during_chunks_frees_the_request(chunked):
    body = {"prompt_token_ids": _prompt(3, 1500), "max_new_tokens": 50, "stream": True}
    with httpx.Client(base_url=chunked.url, timeout=WAIT_S) as c:
        with c.stream("POST", "/generate", params={"adapter": "lora-qv-r8"}, json=body) as r:
            assert r.status_code == 200  # headers only: the client leaves before any token
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        engine = chunked.app.state.engine
        with httpx.Client(base_url=chunked.url) as c:
            in_use = {a["name"]: a["in_use"] for a in c.get("/adapters").json()["adapters"]}
        if not engine.chunked and not engine.running and not any(in_use.values()):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"still held after the disconnect: chunked={len(engine.chunked)}, {in_use}")
    assert _post(chunked, None, {"prompt_token_ids": [5, 6], "max_new_tokens": 2}).status_code == 200
