"""The native API reproduces transformers' greedy decoding, alone and in a busy batch."""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import GPT2, LLAMA, references


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-gpt2"])
def test_greedy_equals_references(base, request):
    srv = request.getfixturevalue("llama_server" if base == "tiny-llama" else "gpt2_server")
    ref = references("peft", base)
    for prompt, expected in zip(ref["prompts"], ref["base_outputs"]):
        out = srv.generate(prompt_token_ids=prompt, max_new_tokens=ref["new_tokens"], ignore_eos=True)
        assert out["token_ids"] == expected


@pytest.mark.parametrize("folder", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_greedy_equals_transformers_generate(folder, request):
    srv = request.getfixturevalue("llama_server" if folder == LLAMA else "gpt2_server")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    rng = random.Random(7)
    for length in (1, 9, 40):
        prompt = [rng.randrange(2, 4096) for _ in range(length)]
        with torch.inference_mode():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=1)
        out = srv.generate(prompt_token_ids=prompt, max_new_tokens=20, ignore_eos=True)
        assert out["token_ids"] == hf[0, length:].tolist()


def test_text_prompt_response_fields(llama_server):
    out = llama_server.generate(prompt="def fibonacci(n):", max_new_tokens=5, ignore_eos=True)
    assert set(out) >= {"text", "token_ids", "adapter", "kind", "mode", "finish_reason", "usage"}
    assert out["kind"] == "base" and out["mode"] == "none" and out["adapter"] is None
    assert out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5 and out["usage"]["prompt_tokens"] > 0
    assert isinstance(out["text"], str) and out["text"]


def test_output_independent_of_batch(llama_server):
    """24 requests of different lengths joining and leaving mid-flight == each alone."""
    rng = random.Random(3)
    jobs = [([rng.randrange(2, 4096) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 40)) for _ in range(24)]
    alone = [llama_server.generate(prompt_token_ids=p, max_new_tokens=n, ignore_eos=True)["token_ids"] for p, n in jobs]

    def run(job):
        return llama_server.generate(prompt_token_ids=job[0], max_new_tokens=job[1], ignore_eos=True)["token_ids"]

    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone


def _sse_events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_stream_equals_non_stream(llama_server):
    body = {"prompt": "import os\n", "max_new_tokens": 16, "ignore_eos": True}
    plain = llama_server.generate(**body)
    with llama_server.client() as c, c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    tokens, final = events[:-1], events[-1]
    assert [e["token_id"] for e in tokens] == plain["token_ids"]
    assert "".join(e["text"] for e in tokens) == plain["text"]
    assert final["token_ids"] == plain["token_ids"] and final["text"] == plain["text"]
    assert final["finish_reason"] == "length"


def test_seeded_sampling_reproducible(llama_server):
    body = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9,
            "top_k": 50, "seed": 1234, "ignore_eos": True}
    first = llama_server.generate(**body)["token_ids"]
    assert llama_server.generate(**body)["token_ids"] == first
    others = {tuple(llama_server.generate(**{**body, "seed": s})["token_ids"]) for s in range(5)}
    assert len(others) > 1


def test_top_k_one_is_greedy(llama_server):
    greedy = llama_server.generate(prompt_token_ids=[9, 8, 7], max_new_tokens=10, ignore_eos=True)
    sampled = llama_server.generate(prompt_token_ids=[9, 8, 7], max_new_tokens=10, temperature=0.8, top_k=1,
                                    seed=3, ignore_eos=True)
    assert sampled["token_ids"] == greedy["token_ids"]


def test_stop_string_ends_generation(llama_server):
    full = llama_server.generate(prompt_token_ids=[5, 6, 7, 8], max_new_tokens=12, ignore_eos=True)
    word = full["text"][len(full["text"]) // 2:][:4]
    assert word.strip()
    out = llama_server.generate(prompt_token_ids=[5, 6, 7, 8], max_new_tokens=12, ignore_eos=True, stop=[word])
    assert out["finish_reason"] == "stop"
    assert word not in out["text"]
    assert full["text"].startswith(out["text"])
    assert len(out["token_ids"]) < 12


def test_eos_stops(llama_server):
    """The fixture model's EOS id is 0: a prompt that makes it emit EOS ends with 'stop'."""
    ref = references("peft", "tiny-llama")
    prompt = ref["prompts"][0]
    free = llama_server.generate(prompt_token_ids=prompt, max_new_tokens=12, ignore_eos=True)["token_ids"]
    out = llama_server.generate(prompt_token_ids=prompt, max_new_tokens=12)
    if 0 in free:
        assert out["finish_reason"] == "stop" and out["token_ids"] == free[: free.index(0) + 1]
    else:
        assert out["finish_reason"] == "length" and out["token_ids"] == free
