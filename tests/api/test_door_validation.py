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
]


@pytest.mark.parametrize("path,raw,field", REFUSED, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(REFUSED)])
def test_refused_with_400_naming_the_field(llama_server, path, raw, field):
    with llama_server.client() as c:
        r = c.post(path, content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(field), message
    assert llama_server.generate(prompt_token_ids=[5, 6], max_new_tokens=2)["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_range_are_served(llama_server, seed):
    out = llama_server.generate(prompt_token_ids=[5, 6], max_new_tokens=3, temperature=1.0, seed=seed)
    assert out["usage"]["completion_tokens"] == 3
