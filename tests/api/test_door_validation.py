"""What the engine cannot take is refused at the door: a 400 naming the field, never a 500."""
from __future__ import annotations

import pytest

JSON = {"content-type": "application/json"}

# Raw JSON: a lone surrogate travels as the escape "\ud800", NaN and Infinity as Python's json writes them.
REFUSED = [
    ("/generate", '{"prompt": "hi", "seed": 18446744073709551616, "temperature": 1}', "seed"),
    ("/generate", '{"prompt": "hi", "seed": -9223372036854775809, "temperature": 1}', "seed"),
    ("/generate", '{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/generate", '{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ("/generate", '{"prompt": "hi", "top_p": NaN}', "top_p"),
    ("/generate", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/generate", '{"prompt": "hi", "stop": ["\\udfff"]}', "stop"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "\\ud800"}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages"),
    ("/v1/chat/completions",
     '{"model": "tiny-llama", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    *[("/v1/chat/completions", f'{{"model": "tiny-llama", "messages": [{{"role": "user", "content": [{part}]}}]}}',
       "messages") for part in ('{"type": "text", "text": 5}', '{"type": "text", "text": null}', '{"type": "text"}',
                                '{"type": "image_url", "image_url": {"url": "x"}}', '{}')],
    ("/tokenize", '{"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}', "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/generate", "[" * 100_000 + "]" * 100_000, "body"),  # nested past the JSON decoder's recursion limit
    ("/generate", '{"prompt": "hi",}', "body"),
    ("/generate", '{"prompt": "hi", "stop": [' + ", ".join(['"s"'] * 65) + ']}', "stop"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi", "stop": "' + "s" * 1001 + '"}', "stop"),
    ("/", '{"inputs": "hi", "parameters": {"stop": [' + ", ".join(['"s"'] * 65) + ']}}', "parameters.stop"),
    ("/generate", '{"prompt": "hi", "stop": ["a", ""]}', "stop"),  # an empty stop would end every answer at once
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi", "stop": ""}', "stop"),
    ("/", '{"inputs": "hi", "parameters": {"stop": [""]}}', "parameters.stop"),
    ("/", '{"inputs": ""}', "inputs"),
    *[("/v1/completions", f'{{"model": "tiny-llama", "prompt": "hi", {field}}}', field.split('"')[1])
      for field in ('"best_of": 2', '"presence_penalty": 0.5', '"frequency_penalty": -1', '"logit_bias": {"5": 100}',
                    '"suffix": "x"')],
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
     '"presence_penalty": 1}', "presence_penalty"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": ["a", "b", "c"], "n": 128, "max_tokens": 1}', "n"),
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "' + "ab" * 140_000
     + '"}]}', "messages"),  # more characters than 2,048 tokens could hold (test below)
    ("/generate?adapter=a&adapter=b", '{"prompt": "hi"}', "adapter"),
    *[(path, body[:-1] + f", {field}}}", field.split('"')[1]) for path, body in (
        ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi"}'),
        ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}'))
      for field in ('"response_format": {"type": "json_object"}', '"tools": [{"type": "function"}]',
                    '"tool_choice": "required"', '"repetition_penalty": 1.2', '"min_tokens": 5', '"min_p": 0.1',
                    '"stop_token_ids": [5]', '"guided_json": {}', '"guided_choice": ["a"]')],
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [' + ", ".join(['{"role": "user", "content": ""}'] * 2049)
     + "]}", "messages"),  # more turns than the context has positions
    ("/generate", b'{"prompt": "\xff"}', "body"),  # not UTF-8
    # no value of another JSON type is converted (OpenAI refuses them): "5" is no int, true no 1
    *[(path, body[:-1] + f", {field}}}", field.split('"')[1]) for path, body in (
        ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi"}'),
        ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}'))
      for field in ('"max_tokens": "5"', '"max_tokens": true', '"n": "2"', '"stream": "yes"', '"temperature": "1"',
                    '"seed": 1.5')],
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi", "logprobs": true}', "logprobs"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi", "echo": "yes"}', "echo"),
    ("/generate", '{"prompt": "hi", "max_new_tokens": "5"}', "max_new_tokens"),
    # vLLM's extra fields, at values that would change the answer: refused, not ignored
    *[(path, body[:-1] + f", {field}}}", field.split('"')[1]) for path, body in (
        ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi"}'),
        ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}'))
      for field in ('"include_stop_str_in_output": true', '"allowed_token_ids": [1]', '"bad_words": ["x"]',
                    '"use_beam_search": true', '"length_penalty": 2', '"skip_special_tokens": false',
                    '"structured_outputs": {"choice": ["a"]}', '"return_tokens_as_token_ids": true',
                    '"prompt_logprobs": 0', '"truncate_prompt_tokens": 5', '"modalities": ["audio"]',
                    '"reasoning_effort": "low"', '"add_special_tokens": true', '"logits_processors": ["x"]',
                    '"mode": "bogus"', '"max_new_tokens": 5')],
    ("/v1/completions", '{"model": "tiny-llama", "prompt_token_ids": [5], "prompt": "hi"}', "prompt_token_ids"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "hi", "stream": true, "stream_options": '
     '{"continuous_usage_stats": true}}', "stream_options.continuous_usage_stats"),
    *[("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
       f'{field}}}', field.split('"')[1]) for field in (
        '"add_generation_prompt": false', '"continue_final_message": true', '"echo": true',
        '"chat_template": "{{ x }}"', '"chat_template_kwargs": {"enable_thinking": false}',
        '"stream_options": {"include_usage": true}')],  # stream_options only with stream: true
    # turns the server cannot honour: tool calls it would drop, a user turn without content
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}, '
     '{"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", '
     '"function": {"name": "f", "arguments": "{}"}}]}]}', "messages.1.tool_calls"),
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": null}]}',
     "messages.0.content"),
    # LoRAX: what its router implements and hotswap does not, values of another JSON type, text UTF-8 cannot hold
    *[("/", f'{{"inputs": "hi", "parameters": {{{field}}}}}', "parameters." + field.split('"')[1]) for field in (
        '"frequency_penalty": 1.5', '"presence_penalty": 0.5', '"top_n_tokens": 3', '"apply_chat_template": true',
        '"max_new_tokens": "4"', '"temperature": "0.5"', '"details": "yes"', '"adapter_id": "\\ud800"',
        '"merged_adapters": {"ids": ["\\ud800"]}', '"mode": "bogus"')],
    ("/", '{"inputs": "hi", "stream": "yes"}', "stream"),
    ("/generate", '{"prompt": "hi", "adapters": [{"name": "x", "weight": "1"}]}', "adapters.0.weight"),
    ("/generate", '{"prompt_token_ids": []}', "prompt_token_ids"),
    ("/tokenize", '{"prompt": "hi", "add_special_tokens": "yes"}', "add_special_tokens"),
    ("/tokenize", '{"prompt": "hi", "return_token_strs": 1}', "return_token_strs"),
    *[(f"/generate?{query}", '{"prompt": "hi"}', field) for query, field in (
        ("adapters=x", "adapters"), ("lora=x", "lora"), ("mode=merged", "mode"),
        ("adapter=x&max_new_tokens=3", "max_new_tokens"))],  # only ?adapter= is read
]


@pytest.mark.parametrize("path,raw,field", REFUSED, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(REFUSED)])
def test_refused_with_400_naming_the_field(llama_server, path, raw, field):
    with llama_server.client() as c:
        r = c.post(path, content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if path == "/" else error["message"]  # LoRAX's shape: {"error": message, "error_type": ...}
    assert message.startswith(field), message
    assert llama_server.generate(prompt_token_ids=[5, 6], max_new_tokens=2)["usage"]["completion_tokens"] == 2



@pytest.mark.parametrize("path,body", [("/generate", {}), ("/v1/completions", {"model": "tiny-llama"}),
                                       ("/", {"inputs": "ab" * 140_000}), ("/tokenize", {})])
def test_text_no_tokenization_could_fit_is_refused_untokenized(llama_server, path, body):
    """More characters than the context's 2,048 tokens of the vocabulary's longest (64 characters)
    could hold, twice over: refused by its length, before the tokenizer spends seconds on it."""
    with llama_server.client() as c:
        r = c.post(path, json={"prompt": "ab" * 140_000, **body} if path != "/" else body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if path == "/" else error["message"]
    assert message.startswith("inputs" if path == "/" else "prompt"), message
    assert "280000 characters" in message


def test_tokenize_refuses_turns_no_context_could_hold_untemplated(llama_server):
    with llama_server.client() as c:
        r = c.post("/tokenize", json={"messages": [{"role": "user", "content": "ab" * 140_000}]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages"), r.text


def test_unimplemented_fields_at_values_that_change_nothing_are_served(llama_server):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_tokens": 0, "tools": [],
               "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "best_of": 1, "n": None,
               "skip_special_tokens": True, "include_stop_str_in_output": False, "add_generation_prompt": True,
               "length_penalty": 1, "modalities": ["text"], "top_k": -1, "stream_options": None,
               "spaces_between_special_tokens": False, "verbosity": "medium", "add_special_tokens": False}
    with llama_server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "max_tokens": 2, **neutral,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_a_chat_template_that_refuses_the_turns_is_a_400_with_its_message(llama_server, monkeypatch):
    tokenizer = llama_server.app.state.base.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('Conversation roles must alternate') }}")
    with llama_server.client() as c:
        chat = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [{"role": "user", "content": "a"}]})
        counted = c.post("/tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    for r in (chat, counted):
        assert r.status_code == 400, r.text
        assert "roles must alternate" in r.json()["error"]["message"] and r.json()["error"]["message"].startswith(
            "messages")

@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_range_are_served(llama_server, seed):
    out = llama_server.generate(prompt_token_ids=[5, 6], max_new_tokens=3, temperature=1.0, seed=seed)
    assert out["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("method, path, allowed", [("GET", "/v1/completions", "POST"), ("OPTIONS", "/generate", "POST"),
                                                   ("PUT", "/adapters/x", "DELETE, GET"), ("POST", "/health", "GET, HEAD")])
def test_a_method_the_route_lacks_is_405_naming_every_method_it_has(llama_server, method, path, allowed):
    with llama_server.client() as c:
        r = c.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allowed
    error = r.json()["error"]
    assert f"expected {allowed.replace(', ', ' or ')} for {path}, got {method}" in error["message"]
    assert error["code" if path.startswith("/v1/") else "type"] == "http_error"


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_the_probes_answer_head(llama_server, path):
    with llama_server.client() as c:
        r = c.head(path)
    assert r.status_code == 200 and r.content == b""


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/"])
@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_another_type_is_415_naming_both(llama_server, path, kind):
    """curl's `-d` alone sends a form type: the answer says what the route reads, not "a valid dictionary"."""
    with llama_server.client() as c:
        r = c.post(path, content=b'{"prompt": "hi"}', headers={"content-type": kind} if kind else {})
    assert r.status_code == 415, r.text
    message = r.json()["error"] if path == "/" else r.json()["error"]["message"]
    assert message == f"content-type: expected application/json, got {kind or 'no content-type'}"


@pytest.mark.parametrize("path", ["/nowhere", "/v1/nowhere", "/adapters/x/nowhere"])
def test_a_path_no_route_has_is_404_naming_it(llama_server, path):
    with llama_server.client() as c:
        r = c.post(path, json={})
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert message == f"path: expected a route of this server (GET /openapi.json lists them), got POST {path}"
