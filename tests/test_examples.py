"""The embedded default model and its example adapters, as a newcomer meets them (`make serve`).

The default model was pre-trained on the Python standard library (scripts/pretrain.py); each
example adapter was trained on a sub-corpus of it (scripts/train_adapters.py). Served here, each
must lower the perplexity of held-out text of its own kind, scored through the scoring API.
"""
from __future__ import annotations

import httpx
import pytest
from tokenizers import Tokenizer

from scripts.evaluate import perplexity
from scripts.train_adapters import KINDS, Data
from server.model import DEFAULT_MODEL_DIR
from tests.conftest import live_server

EXAMPLES = {r.name: kind for kind, r in KINDS.items()}
WINDOWS = 6  # held-out windows (of the length the adapter was trained on) scored per adapter


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("examples")) as srv:  # the embedded model, a new store
        yield srv


def test_a_new_store_gets_the_examples(server):
    listing = httpx.get(f"{server.url}/adapters", timeout=30).json()["adapters"]
    assert {a["name"]: a["kind"] for a in listing} == EXAMPLES


def test_the_default_model_answers_with_code(server):
    r = httpx.post(f"{server.url}/generate", json={"prompt": "def fibonacci(n):", "max_new_tokens": 24}, timeout=60)
    text = r.json()["text"]
    assert "\n" in text and ("    " in text or "return" in text), text


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_example_lowers_held_out_perplexity_of_its_own_data(server, kind):
    recipe = KINDS[kind]
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    windows = Data(recipe.subcorpus, tokenizer, recipe.context).held_out[:WINDOWS]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        base = perplexity(client, "default_model", windows)
        adapted = perplexity(client, recipe.name, windows)
    assert adapted < 0.95 * base, (recipe.name, base, adapted)  # at least 5% lower


def test_a_deleted_example_stays_deleted_after_a_restart(tmp_path):
    with live_server(tmp_path) as srv:
        assert httpx.delete(f"{srv.url}/adapters/docstring-lora", timeout=30).status_code == 200
    with live_server(tmp_path) as srv:
        names = {a["name"] for a in httpx.get(f"{srv.url}/adapters", timeout=30).json()["adapters"]}
    assert names == set(EXAMPLES) - {"docstring-lora"}
