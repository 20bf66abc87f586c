"""Scoring with /v1/completions (echo + logprobs) equals the reference libraries' log_softmax."""
from __future__ import annotations

import concurrent.futures as cf
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import FIXTURES, LLAMA, LiveServer, live_server
from tests.store.helpers import folder_files, upload

PEFT = FIXTURES / "peft" / "tiny-llama"
PROMPT = [5, 17, 301, 42, 999, 7, 12, 88, 4]
TOL = 1e-4


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    adapters = [f"lora={PEFT / 'lora-qv-r8'}", f"soft={PEFT / 'prompt-16'}"]
    with live_server(tmp_path_factory.mktemp("scoring"), model=LLAMA, device="cpu", dtype="float32",
                     adapter=adapters) as srv:
        with srv.client() as c:
            assert upload(c, "lora-merged", files=folder_files(PEFT / "lora-qv-r8"), default_mode="merged").status_code == 201
        yield srv


def _base() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(LLAMA, local_files_only=True, dtype=torch.float32).eval()


def _peft(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_base(), PEFT / name).eval()


def _log_softmax(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """ids: [L] -> [P, V] float32 log_softmax at every position of the model's output (virtual ones included)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [P, V]
    return torch.log_softmax(logits.float(), dim=-1)


def _score(server: LiveServer, model: str, prompt, **body) -> dict:
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "echo": True, "logprobs": 2,
                                            "max_tokens": 0, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _prompt_scores(lp: torch.Tensor, ids: list[int]) -> list[float]:
    """lp: [len(ids) - 1, V] rows predicting ids[1:] -> their logprobs."""
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def _assert_close(got: list[float | None], want: list[float]) -> None:
    assert got[0] is None
    assert len(got) == len(want) + 1
    assert max(abs(g - w) for g, w in zip(got[1:], want)) < TOL


def test_base_prompt_scores_match_transformers(server):
    choice = _score(server, "tiny-llama", PROMPT)
    lp = _log_softmax(_base(), PROMPT)[:-1]
    _assert_close(choice["logprobs"]["token_logprobs"], _prompt_scores(lp, PROMPT))
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(PROMPT)


@pytest.mark.parametrize("name", ["lora", "lora-merged"])
def test_lora_prompt_scores_match_peft(server, name):
    choice = _score(server, name, PROMPT)
    lp = _log_softmax(_peft("lora-qv-r8"), PROMPT)[:-1]
    _assert_close(choice["logprobs"]["token_logprobs"], _prompt_scores(lp, PROMPT))


def test_soft_prompt_scores_skip_virtual_tokens(server, tmp_path):
    model = _peft("prompt-16")
    n_virtual = model.peft_config["default"].num_virtual_tokens
    want = _prompt_scores(_log_softmax(model, PROMPT)[n_virtual:-1], PROMPT)  # positions after the virtual tokens
    _assert_close(_score(server, "soft", PROMPT)["logprobs"]["token_logprobs"], want)
    with live_server(tmp_path, model=LLAMA, device="cpu", dtype="float32", prefix_cache=False,
                     adapter=[f"soft={PEFT / 'prompt-16'}"]) as uncached:  # virtual tokens fed at every prefill
        _assert_close(_score(uncached, "soft", PROMPT)["logprobs"]["token_logprobs"], want)


def test_generated_logprobs_are_log_softmax_of_the_sequence(server):
    choice = _score(server, "tiny-llama", PROMPT, max_tokens=4, logprobs=3, ignore_eos=True)
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == len(PROMPT) + 4
    with server.client() as c:
        ids = c.post("/generate", json={"prompt_token_ids": PROMPT, "max_new_tokens": 4, "ignore_eos": True}).json()["token_ids"]
    seq = PROMPT + ids
    lp = _log_softmax(_base(), seq)
    want = [lp[len(PROMPT) - 1 + k, t].item() for k, t in enumerate(ids)]
    got = lps["token_logprobs"][len(PROMPT):]
    assert max(abs(g - w) for g, w in zip(got, want)) < TOL
    for top, token, chosen in zip(lps["top_logprobs"][len(PROMPT):], lps["tokens"][len(PROMPT):], got):
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert top[token] == pytest.approx(chosen, abs=1e-6)  # greedy: the chosen token is the most likely


def test_logprobs_without_echo_score_only_generated(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "logprobs": 0,
                                            "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    lps = r.json()["choices"][0]["logprobs"]
    assert len(lps["tokens"]) == 3 and all(x <= 0 for x in lps["token_logprobs"])
    # logprobs 0: each top_logprobs holds the chosen token alone, with its score (vLLM's convention)
    assert lps["top_logprobs"] == [{t: lp} for t, lp in zip(lps["tokens"], lps["token_logprobs"])]


def test_scoring_in_a_mixed_batch_equals_alone(server):
    alone = _score(server, "lora", PROMPT)["logprobs"]["token_logprobs"]
    with cf.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(_score, server, m, PROMPT) for m in ("lora", "tiny-llama", "soft", "lora")]
        mixed = [j.result()["logprobs"]["token_logprobs"] for j in jobs]
    assert max(abs(a - b) for a, b in zip(alone[1:], mixed[0][1:])) < TOL
    assert max(abs(a - b) for a, b in zip(alone[1:], mixed[3][1:])) < TOL


def test_openai_client_parses_echo_scores(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny-llama", prompt="def add(a, b):", echo=True, logprobs=1, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == "def add(a, b):"
    lps = choice.logprobs
    assert lps.token_logprobs[0] is None and all(math.isfinite(x) for x in lps.token_logprobs[1:])
    assert lps.top_logprobs[0] is None
    # the top 1, and the chosen token beside it when it is not the top one (vLLM's convention)
    assert all(t in top and 1 <= len(top) <= 2 for t, top in zip(lps.tokens[1:], lps.top_logprobs[1:]))
    assert lps.text_offset == sorted(lps.text_offset) and lps.text_offset[0] == 0
    assert out.usage.completion_tokens == 0


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2, "logprobs": 1, "stream": True}, "stream"),
    ({"max_tokens": 2, "logprobs": 6}, "logprobs"),
])
def test_bad_scoring_requests_are_400(server, body, message):
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x", **body})
    assert r.status_code == 400 and message in r.text
