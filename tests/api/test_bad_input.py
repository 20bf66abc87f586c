"""Bad input gets a 4xx JSON error naming what was expected and what came; the server keeps serving."""
from __future__ import annotations

import pytest

BAD = [
    ({}, 400, "prompt"),
    ({"prompt": "a", "prompt_token_ids": [1]}, 400, "exactly one of prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt_token_ids": "abc"}, 400, "prompt_token_ids"),
    ({"prompt_token_ids": [1, "x"]}, 400, "prompt_token_ids"),
    ({"prompt_token_ids": [1.5]}, 400, "prompt_token_ids"),
    ({"prompt_token_ids": []}, 400, "at least one token"),
    ({"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": "many"}, 400, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 5000}, 400, "at most 4096"),
    ({"prompt_token_ids": [5] * 2000, "max_new_tokens": 100}, 400, "at most 2048"),
    ({"prompt_token_ids": [4096]}, 400, "[0, 4096)"),
    ({"prompt_token_ids": [-1]}, 400, "[0, 4096)"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "mode": "sideways"}, 400, "mode"),
    ({"prompt": "hi", "mode": "merged"}, 400, "merged applies to LoRA"),
]


@pytest.mark.parametrize("body,status,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_body(llama_server, body, status, needle):
    with llama_server.client() as c:
        r = c.post("/generate", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message"}
    assert needle in err["message"]
    assert llama_server.generate(prompt_token_ids=[5, 6], max_new_tokens=2)["usage"]["completion_tokens"] >= 1


def test_not_json(llama_server):
    with llama_server.client() as c:
        r = c.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "error" in r.json()


def test_unknown_adapter_is_404(llama_server):
    with llama_server.client() as c:
        r = c.post("/generate", params={"adapter": "nope"}, json={"prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "adapter_not_found"
    assert "'nope'" in r.json()["error"]["message"]


def test_unknown_route_is_json_404(llama_server):
    with llama_server.client() as c:
        r = c.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()
