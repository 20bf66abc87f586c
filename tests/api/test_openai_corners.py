"""The corners of the OpenAI API that real clients reach, with the official `openai` client.

Batched prompts, `n`, seeds, explicit nulls, stream_options usage, chat logprobs, model cards,
OpenAI's error shape, soft-prompt usage, chat without a template or without max_tokens.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import openai
import pytest
from openai import OpenAI

from server.api import openai_format
from tests.conftest import FIXTURES, LLAMA, LiveServer, live_server

PEFT = FIXTURES / "peft" / "tiny-llama"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    adapters = [f"soft={PEFT / 'prompt-16'}", f"lora={PEFT / 'lora-qv-r8'}"]
    with live_server(tmp_path_factory.mktemp("corners"), model=LLAMA, adapter=adapters) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _text(client: OpenAI, prompt, model: str = "tiny-llama", **kw) -> str:
    return client.completions.create(model=model, prompt=prompt, **{"max_tokens": 6, **GREEDY, **kw}).choices[0].text


@pytest.mark.parametrize("prompts", [["x = 1", "def f(", "import"], [[11, 12, 13], [40, 41], [7]], ["only one"]],
                         ids=["strings", "token-ids", "one"])
def test_prompt_list_gives_one_choice_per_prompt_in_order(client, prompts):
    out = client.completions.create(model="tiny-llama", prompt=prompts, max_tokens=6, **GREEDY)
    assert [c.index for c in out.choices] == list(range(len(prompts)))
    assert [c.text for c in out.choices] == [_text(client, p) for p in prompts]
    assert out.usage.completion_tokens == 6 * len(prompts)


def test_n_greedy_choices_are_equal_and_indexed(client):
    out = client.completions.create(model="lora", prompt=["a", "b"], n=3, max_tokens=5, **GREEDY)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [_text(client, "a", "lora", max_tokens=5)] * 3 + \
        [_text(client, "b", "lora", max_tokens=5)] * 3
    chat = client.chat.completions.create(model="tiny-llama", messages=CHAT, n=2, max_tokens=5, **GREEDY)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message


def test_n_seeds_follow_vllm(client):
    """Sample j of a request seeded s equals a single request seeded s + j."""
    sampled = {"temperature": 1.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(model="tiny-llama", prompt="def", n=3, seed=40, **sampled)
    alone = [client.completions.create(model="tiny-llama", prompt="def", seed=40 + j, **sampled).choices[0].text
             for j in range(3)]
    assert [c.text for c in out.choices] == alone
    assert len(set(alone)) > 1  # the seeds differ, so (at temperature 1, 8 tokens) do the samples


def test_explicit_nulls_are_absent(server):
    nulls = {k: None for k in ("max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs",
                               "echo", "stop", "seed", "user", "top_k", "presence_penalty", "suffix", "best_of")}
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x", **nulls})
        # each chat bounded by the other length field (a chat without one runs to the context end: tested apart)
        chats = [c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT, **nulls,
                                                      "top_logprobs": None, **lengths})
                 for lengths in ({"max_completion_tokens": 3}, {"max_completion_tokens": None, "max_tokens": 3})]
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens
    for chat in chats:
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_usage_only_when_asked_in_a_trailing_chunk(client, chat):
    def create(**kw):
        if chat:
            return client.chat.completions.create(model="soft", messages=CHAT, max_tokens=7, n=2, **GREEDY, **kw)
        return client.completions.create(model="soft", prompt=["a", "b c"], max_tokens=7, **GREEDY, **kw)

    plain = create()
    silent = list(create(stream=True))
    assert all(c.usage is None and c.choices for c in silent)
    counted = list(create(stream=True, stream_options={"include_usage": True}))
    *body, last = counted
    assert last.choices == [] and last.usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None and c.choices for c in body)


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, logprobs=True,
                                         top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the best one
    # the tokens' bytes join into the reply (no template: its leading whitespace, and those tokens, left out)
    assert bytes(b for e in content for b in e.bytes).decode().lstrip() == out.choices[0].message.content
    assert not content[0].token.isspace()
    bare = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2, logprobs=True, **GREEDY)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2).choices[0].logprobs is None


def test_logprob_tokens_exclude_cut_stop_text(client):
    full = client.completions.create(model="tiny-llama", prompt="def", max_tokens=12, logprobs=1, **GREEDY).choices[0]
    tokens, offsets = full.logprobs.tokens, full.logprobs.text_offset
    k = next(k for k in range(1, len(tokens)) if len(tokens[k]) >= 2
             and full.text.find(full.text[offsets[k] + 1:offsets[k] + 4]) == offsets[k] + 1)
    cut_at = offsets[k] + 1  # a stop string that begins one character into token k
    stop = full.text[cut_at:cut_at + 3]
    out = client.completions.create(model="tiny-llama", prompt="def", max_tokens=12, logprobs=1, stop=[stop],
                                    **GREEDY).choices[0]
    assert out.text == full.text[:cut_at]
    assert out.logprobs.tokens == tokens[:k + 1]  # token k still gives a character; the ones after it none
    assert len(out.logprobs.token_logprobs) == len(out.logprobs.top_logprobs) == k + 1


def test_model_cards(client, server):
    base = client.models.retrieve("tiny-llama")
    assert base.id == "tiny-llama" and base.model_extra["max_model_len"] == 2048
    soft = client.models.retrieve("soft")
    assert soft.model_extra["max_model_len"] == 2048 - 16 and soft.model_extra["parent"] == "tiny-llama"
    listed = {m.id: m.model_extra["max_model_len"] for m in client.models.list().data}
    assert listed["soft"] == 2048 - 16 and listed["lora"] == 2048
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"


def test_errors_have_openai_shape_and_names(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=5000)
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["param"] == "max_tokens"
    assert "max_tokens" in body["message"] and "max_new_tokens" not in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-llama", prompt="x", temperature=7)
    assert err.value.body["param"] == "temperature" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2100)
    assert "prompt + max_tokens" in err.value.body["message"]
    with httpx.Client(base_url=server.url) as c:  # the native routes keep DESIGN's shape
        assert set(c.post("/generate", json={"prompt": "x", "max_new_tokens": 0}).json()["error"]) == {"type", "message"}


def test_soft_prompt_usage_counts_virtual_tokens(client, server):
    out = client.completions.create(model="soft", prompt=[5, 6, 7], max_tokens=3, **GREEDY)
    assert out.usage.prompt_tokens == 3 + 16 and out.usage.total_tokens == 3 + 16 + 3


def test_chat_without_template_starts_with_no_whitespace(client):
    for prompt in ("hello", "def add(a, b):", "x"):
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, **GREEDY)
        text = reply.choices[0].message.content
        assert text and text == text.lstrip()
        stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, stream=True,
                                                **GREEDY)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_chat_without_max_tokens_runs_to_the_context_end(client, server):
    """No max_tokens: the reply may fill the context (vLLM's default), not a fixed 256."""
    def count(messages) -> int:
        with server.client() as c:
            r = c.post("/tokenize", json={"model": "tiny-llama", "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["count"]

    per_word = count([{"role": "user", "content": "word " * 200}]) - count([{"role": "user", "content": ""}])
    words = int((2048 - 300) / (per_word / 200))
    messages = [{"role": "user", "content": "word " * words}]
    n_prompt = count(messages)
    assert 2048 - 400 < n_prompt < 2048 - 256, "the prompt should leave more than 256 tokens of room"
    out = client.chat.completions.create(model="tiny-llama", messages=messages, **GREEDY)
    assert out.usage.completion_tokens == 2048 - n_prompt


def test_mode_chooses_merged_or_unmerged_per_request_on_the_openai_api_too(client, server):
    """`mode` as an extra body field: the same tokens either way (merged == unmerged), the mode used
    is the one asked for (the server counts it), and merged without a LoRA is refused as /generate refuses it."""
    def ran(mode: str) -> float:
        return _counter(server, "hotswap_requests_total", mode=mode)
    before = ran("merged")
    merged = _text(client, "def add(a, b):", "lora", max_tokens=8, extra_body={"ignore_eos": True, "mode": "merged"})
    unmerged = _text(client, "def add(a, b):", "lora", max_tokens=8, extra_body={"ignore_eos": True, "mode": "unmerged"})
    assert merged == unmerged and ran("merged") == before + 1
    with pytest.raises(openai.BadRequestError) as err:
        _text(client, "x", "tiny-llama", extra_body={"mode": "merged"})
    assert err.value.body["param"] == "mode"


def _counter(server: LiveServer, name: str, **labels: str) -> float:
    """The sum of `name`'s series whose labels include `labels`, from /metrics."""
    with httpx.Client(base_url=server.url) as c:
        metrics = c.get("/metrics").text
    return sum(float(line.rpartition(" ")[2]) for line in metrics.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_the_prompt_token_counter_agrees_with_usage(client, server):
    """A soft prompt's virtual tokens are prompt tokens in usage, and in hotswap_prompt_tokens_total."""
    before = _counter(server, "hotswap_prompt_tokens_total", kind="prompt")
    out = client.completions.create(model="soft", prompt=[5, 6, 7], max_tokens=1)
    assert _counter(server, "hotswap_prompt_tokens_total", kind="prompt") - before == out.usage.prompt_tokens == 19


def test_a_stream_has_one_created_time_and_a_system_fingerprint(client, monkeypatch):
    """Each chunk of a stream carries the time its answer began, however long it runs (here a clock
    that moves a second at each look)."""
    clock = itertools.count(1_700_000_000)
    monkeypatch.setattr(openai_format, "time", SimpleNamespace(time=lambda: next(clock)))
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, n=4, stream=True,
                                                 **GREEDY))
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1
    assert all("system_fingerprint" in c.model_fields_set for c in chunks)


def test_a_turns_name_reaches_the_prompt(client):
    plain = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=1)
    named = client.chat.completions.create(model="tiny-llama", messages=[{**CHAT[0], "name": "ada"}], max_tokens=1)
    assert named.usage.prompt_tokens > plain.usage.prompt_tokens


def test_errors_name_the_field_the_client_sent(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=CHAT, max_completion_tokens=5000)
    assert err.value.body["param"] == "max_completion_tokens"
    for prompt in (123, [1, 2, "x"]):  # no form of `prompt` fits: one error about prompt, each form's complaint
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny-llama", prompt=prompt)
        body = err.value.body
        assert body["param"] == "prompt" and body["message"].startswith("prompt: no form fits (str: ")
        assert "; prompt" not in body["message"] and body["message"].endswith(f"; got {prompt!r}")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2100)
    assert err.value.body["param"] == "max_tokens"
