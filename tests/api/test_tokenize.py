"""vLLM's POST /tokenize and POST /detokenize: vLLM's bodies, the server's own tokenizer and chat prompt."""
from __future__ import annotations

from transformers import AutoTokenizer

from tests.conftest import LLAMA


def _post(srv, path: str, body: dict):
    with srv.client() as c:
        return c.post(path, json=body)


def test_tokenize_prompt_equals_the_tokenizer(llama_server):
    tok = AutoTokenizer.from_pretrained(LLAMA)
    r = _post(llama_server, "/tokenize", {"model": "tiny-llama", "prompt": "def add(a, b):", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("def add(a, b):") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048 and body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    bare = _post(llama_server, "/tokenize", {"prompt": "def add(a, b):", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("def add(a, b):", add_special_tokens=False) and bare["token_strs"] is None


def test_tokenize_messages_is_the_chat_prompt(llama_server):
    messages = [{"role": "user", "content": "hello"}]
    ids = _post(llama_server, "/tokenize", {"model": "tiny-llama", "messages": messages}).json()["tokens"]
    with llama_server.client() as c:
        chat = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == len(ids)


def test_detokenize_round_trips(llama_server):
    ids = _post(llama_server, "/tokenize", {"prompt": "x = [1, 2]", "add_special_tokens": False}).json()["tokens"]
    assert _post(llama_server, "/detokenize", {"model": "tiny-llama", "tokens": ids}).json() == {"prompt": "x = [1, 2]"}


def test_bad_bodies_are_400_or_404(llama_server):
    assert _post(llama_server, "/tokenize", {"model": "tiny-llama"}).status_code == 400
    assert _post(llama_server, "/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}).status_code == 400
    assert _post(llama_server, "/detokenize", {"tokens": [99999]}).status_code == 400
    missing = _post(llama_server, "/tokenize", {"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and "'nope'" in missing.json()["error"]["message"]
