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
    *[("/v1/completions", f'{{"model": "tiny-llama", "prompt": "hi", {field}}}', field.split('"')[1])
      for field in ('"best_of": 2', '"presence_penalty": 0.5', '"frequency_penalty": -1', '"logit_bias": {"5": 100}',
                    '"suffix": "x"')],
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
     '"presence_penalty": 1}', "presence_penalty"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": ["a", "b", "c"], "n": 128, "max_tokens": 1}', "n"),
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "' + "ab" * 140_000
     + '"}]}', "messages"),  # more characters than 2,048 tokens could hold (test below)
    ("/generate?adapter=a&adapter=b", '{"prompt": "hi"}', "adapter"),
    ("/generate", b'{"prompt": "\xff"}', "body"),  # not UTF-8
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
                                       ("/", {"inputs": "ab" * 140_000})])
def test_text_no_tokenization_could_fit_is_refused_untokenized(llama_server, path, body):
    """More characters than the context's 2,048 tokens of the vocabulary's longest (64 characters)
    could hold, twice over: refused by its length, before the tokenizer spends seconds on it."""
    with llama_server.client() as c:
        r = c.post(path, json={"prompt": "ab" * 140_000, **body} if path != "/" else body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if path == "/" else error["message"]
    assert message.startswith("prompt") or message.startswith("inputs"), message
    assert "280000 characters" in message

@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_range_are_served(llama_server, seed):
    out = llama_server.generate(prompt_token_ids=[5, 6], max_new_tokens=3, temperature=1.0, seed=seed)
    assert out["usage"]["completion_tokens"] == 3
