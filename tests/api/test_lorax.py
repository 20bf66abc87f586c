"""`lorax-client` works unchanged: generate and generate_stream with an adapter equal our native answer."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from lorax import Client
from lorax.errors import NotFoundError, ValidationError

from tests.conftest import FIXTURES, LLAMA, LiveServer, live_server

PEFT = FIXTURES / "peft" / "tiny-llama"
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    adapters = [f"lora={PEFT / 'lora-qv-r8'}", f"soft={PEFT / 'prompt-16'}"]
    with live_server(tmp_path_factory.mktemp("lorax"), model=LLAMA, adapter=adapters) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url)


@pytest.mark.parametrize("adapter", ["lora", "soft", None])
def test_generate_equals_native(client, server, adapter):
    native = server.generate(adapter, prompt=PROMPT, max_new_tokens=9, ignore_eos=True)
    out = client.generate(PROMPT, adapter_id=adapter, max_new_tokens=9, ignore_eos_token=True)
    assert out.generated_text == native["text"]
    d = out.details
    assert d.finish_reason == "length" and d.generated_tokens == 9 and d.seed is None
    assert [t.id for t in d.tokens] == native["token_ids"] and all(t.logprob <= 0 for t in d.tokens)
    assert d.prompt_tokens == native["usage"]["prompt_tokens"]  # both count a soft prompt's 16 virtual tokens


def test_native_usage_counts_a_soft_prompts_virtual_tokens(server):
    def used(adapter: str | None) -> int:
        return server.generate(adapter, prompt=PROMPT, max_new_tokens=1)["usage"]["prompt_tokens"]
    assert used("soft") == used(None) + 16


@pytest.mark.parametrize("adapter", ["lora", None])
def test_generate_stream_equals_native(client, server, adapter):
    native = server.generate(adapter, prompt=PROMPT, max_new_tokens=9, ignore_eos=True)
    events = list(client.generate_stream(PROMPT, adapter_id=adapter, max_new_tokens=9, ignore_eos_token=True))
    assert [e.token.id for e in events] == native["token_ids"]
    assert "".join(e.token.text for e in events if not e.token.special) == native["text"]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == native["text"]
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 9


def test_stop_sequence_and_eos_reasons(client, server):
    full = server.generate("lora", prompt=PROMPT, max_new_tokens=12, ignore_eos=True)["text"]
    stop = full[5:8]
    out = client.generate(PROMPT, adapter_id="lora", max_new_tokens=12, stop_sequences=[stop])
    # as LoRAX and TGI: the text up to the token that completed the stop, stop included
    text, end = out.generated_text, full.find(stop) + len(stop)
    assert full.startswith(text) and len(text) >= end and stop not in text[:end - 1]
    assert out.details.finish_reason == "stop_sequence" and out.details.generated_tokens < 12
    streamed = list(client.generate_stream(PROMPT, adapter_id="lora", max_new_tokens=12, stop_sequences=[stop]))
    assert "".join(e.token.text for e in streamed) == out.generated_text
    assert streamed[-1].details.finish_reason == "stop_sequence"


def test_sampling_is_seeded_and_reported(client):
    a = client.generate(PROMPT, do_sample=True, seed=7, max_new_tokens=8, ignore_eos_token=True)
    b = client.generate(PROMPT, temperature=0.9, seed=7, max_new_tokens=8, ignore_eos_token=True)
    again = client.generate(PROMPT, do_sample=True, seed=7, max_new_tokens=8, ignore_eos_token=True)
    assert a.generated_text == again.generated_text and a.details.seed == 7 and b.details.seed == 7
    drawn = client.generate(PROMPT, do_sample=True, max_new_tokens=8, ignore_eos_token=True)  # LoRAX draws one
    replay = client.generate(PROMPT, do_sample=True, seed=drawn.details.seed, max_new_tokens=8, ignore_eos_token=True)
    assert drawn.details.seed is not None and replay.generated_text == drawn.generated_text


def test_details_options(client):
    out = client.generate(PROMPT, max_new_tokens=3, return_full_text=True, decoder_input_details=True,
                          return_k_alternatives=2, ignore_eos_token=True)
    assert out.generated_text.startswith(PROMPT)
    prefill = out.details.prefill
    assert prefill[0].logprob is None and all(t.logprob <= 0 for t in prefill[1:]) and len(prefill) > 1
    assert all(len(t.alternative_tokens) == 2 for t in out.details.tokens)


def test_errors_are_lorax_errors(client):
    with pytest.raises(NotFoundError, match="'nope'"):
        client.generate(PROMPT, adapter_id="nope", max_new_tokens=2)
    with pytest.raises(ValidationError, match="repetition_penalty"):
        client.generate(PROMPT, repetition_penalty=1.3, max_new_tokens=2)


def test_generate_route_tells_the_two_bodies_apart(server):
    native = server.generate("lora", prompt=PROMPT, max_new_tokens=5, ignore_eos=True)
    lorax_body = {"inputs": PROMPT, "parameters": {"adapter_id": "lora", "max_new_tokens": 5, "ignore_eos_token": True,
                                                   "details": True, "temperature": None}}
    with server.client() as c:
        one = c.post("/generate", json=lorax_body)
        ours = c.post("/generate", params={"adapter": "lora"}, json={"prompt": PROMPT, "max_new_tokens": 5,
                                                                    "ignore_eos": True})
        with c.stream("POST", "/generate_stream", json=lorax_body) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert one.status_code == 200 and one.json()["generated_text"] == native["text"]
    assert one.json()["details"]["tokens"][0]["id"] == native["token_ids"][0]
    assert ours.json() == native
    assert events[-1]["generated_text"] == native["text"]


def test_mode_in_parameters_and_the_base_model_as_adapter_id(server, client):
    """`parameters.mode` is read (merged == unmerged; merged without a LoRA is refused, as on
    /generate); `adapter_id` naming the base model means no adapter, as in LoRAX."""
    def text(**parameters) -> str:
        with server.client() as c:
            r = c.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, **parameters}})
        assert r.status_code == 200, r.text
        return r.json()[0]["generated_text"]
    assert text(adapter_id="lora", mode="merged") == text(adapter_id="lora", mode="unmerged") != text()
    with server.client() as c:
        r = c.post("/", json={"inputs": PROMPT, "parameters": {"mode": "merged"}})
    assert r.status_code == 400 and r.json()["error"].startswith("mode")
    assert text(adapter_id="tiny-llama") == text()
