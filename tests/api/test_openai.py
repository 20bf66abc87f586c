"""The official openai client works against the OpenAI-compatible endpoints."""
from __future__ import annotations

import openai
import pytest
from openai import OpenAI


@pytest.fixture(scope="module")
def client(llama_server) -> OpenAI:
    return OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_base(client, llama_server):
    ids = [m.id for m in client.models.list().data]
    assert "tiny-llama" in ids


def test_completion_matches_native(client, llama_server):
    native = llama_server.generate(prompt="def add(a, b):", max_new_tokens=10, ignore_eos=True)
    out = client.completions.create(model="tiny-llama", prompt="def add(a, b):", max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == native["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10
    assert out.usage.prompt_tokens == native["usage"]["prompt_tokens"]


def test_completion_token_id_prompt(client, llama_server):
    native = llama_server.generate(prompt_token_ids=[11, 12, 13], max_new_tokens=6, ignore_eos=True)
    out = client.completions.create(model="tiny-llama", prompt=[11, 12, 13], max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == native["text"]


def test_completion_stream(client):
    plain = client.completions.create(model="tiny-llama", prompt="x = ", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny-llama", prompt="x = ", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion(client):
    out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=5, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=5, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == out.choices[0].message.content


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="missing", prompt="x", max_tokens=2)
    assert "missing" in str(err.value)


def test_bad_max_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=0)
