"""The adapter a request names, as the cluster's ingress reads it to keep an adapter's requests on one replica."""
from __future__ import annotations

import json

import pytest

from server.cluster.routing import adapter_of

BASE = "tiny-llama"


@pytest.mark.parametrize("path, query, body, named", [
    ("/generate", b"adapter=a", {"prompt": "hi"}, "a"),
    ("/generate", b"adapter=a", {"inputs": "hi", "parameters": {"adapter_id": "b"}}, "b"),  # LoRAX's body on /generate
    ("/generate", b"adapter=a", {"inputs": "hi", "prompt": "hi"}, "a"),  # ours: it has a prompt
    ("/", b"", {"inputs": "hi", "parameters": {"adapter_id": "b"}}, "b"),
    ("/generate_stream", b"", {"inputs": "hi"}, ""),
    ("/generate_stream", b"", {"inputs": "hi", "parameters": {"adapter_id": 5}}, ""),  # the replica refuses it
    ("/v1/completions", b"", {"model": "c", "prompt": "hi"}, "c"),
    ("/v1/chat/completions", b"", {"model": BASE, "messages": []}, ""),  # the base model's name: no adapter
    ("/v1/completions", b"", ["not", "an", "object"], ""),
    ("/adapters", b"", {"model": "c"}, ""),
])
def test_the_adapter_a_request_names(path, query, body, named):
    assert adapter_of(path, query, json.dumps(body).encode(), BASE) == named


@pytest.mark.parametrize("body", [b"{not json", b"[" * 100_000, b"\xff"])
def test_a_body_that_is_no_json_object_names_none(body):
    assert adapter_of("/v1/completions", b"", body, BASE) == ""
    assert adapter_of("/generate", b"adapter=a", body, BASE) == "a"
