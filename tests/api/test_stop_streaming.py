"""A stop string never leaks into a stream: for a fixed greedy output and every position in its text
as the start of a stop string, the streamed text equals the JSON text, in both APIs."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from server.api.stops import held_back, sendable

PROMPT = "def add(a, b):"
N_TOKENS = 10


def test_held_back_is_the_longest_tail_that_may_begin_a_stop():
    assert held_back("Return a bra", ("bramm",)) == 3
    assert held_back("Return a b", ("bramm", "a bx")) == 3
    assert held_back("Return", ("bramm",)) == 0
    assert held_back("aaa", ("aab",)) == 2
    assert sendable("Return a bra", ("bramm",)) == "Return a "
    assert sendable("xyz", ()) == "xyz"


def _native(srv, stop: list[str]) -> tuple[str, str]:
    body = {"prompt": PROMPT, "max_new_tokens": N_TOKENS, "ignore_eos": True, "stop": stop}
    plain = srv.generate(**body)["text"]
    streamed, final = "", None
    with srv.client() as c, c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "finish_reason" in event:
                    final = event
                else:
                    streamed += event["text"]
    assert final is not None and final["text"] == plain
    return plain, streamed


def _openai(client: OpenAI, stop: list[str]) -> tuple[str, str]:
    kw = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "stop": stop,
          "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    return plain, streamed


@pytest.fixture(scope="module")
def greedy_text(llama_server) -> str:
    text = llama_server.generate(prompt=PROMPT, max_new_tokens=N_TOKENS, ignore_eos=True)["text"]
    assert len(text) > 20
    return text


def _stops(text: str) -> list[list[str]]:
    """At every position: a stop string found there, and one that only begins there (never completes)."""
    found = [[text[i:i + 3]] for i in range(len(text) - 1)]
    unfinished = [[text[i:] + "\x00"] for i in range(len(text))]
    return found + unfinished


def test_native_stream_equals_json_for_every_stop_position(llama_server, greedy_text):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda stop: (stop, *_native(llama_server, stop)), _stops(greedy_text)))
    for stop, plain, streamed in results:
        assert streamed == plain, f"stop {stop!r}"
        assert plain == (greedy_text[:greedy_text.find(stop[0])] if stop[0] in greedy_text else greedy_text)


def test_openai_stream_equals_json_for_every_stop_position(llama_server, greedy_text):
    client = OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda stop: (stop, *_openai(client, stop)), _stops(greedy_text)))
    for stop, plain, streamed in results:
        assert streamed == plain, f"stop {stop!r}"
