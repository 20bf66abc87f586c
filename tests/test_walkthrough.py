"""Every command of the README's walk-through runs against a live server and succeeds."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import live_server

ROOT = Path(__file__).resolve().parents[1]
README_URL = "http://127.0.0.1:8000"


def _walkthrough_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[str]:
    """One shell command per logical line (backslash continuations joined)."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("walk")) as srv:  # the embedded default model
        yield srv


def test_walkthrough_commands(server):
    blocks = _walkthrough_blocks()
    assert len(blocks) >= 7
    outputs = []
    for lang, block in blocks:
        code = block.replace(README_URL, server.url)
        if lang == "python":
            run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            outputs.append(run.stdout)
            continue
        for command in _commands(code):
            if command.startswith(("docker", "make")):
                continue
            run = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
            outputs.append(run.stdout)
    listings = [json.loads(o) for o in outputs if o.startswith('{"adapters"')]
    examples = {"docstring-lora": "lora", "unittest-prompt": "prompt", "prose-bottleneck": "bottleneck"}
    assert {a["name"]: a["kind"] for a in listings[0]["adapters"]} == examples  # registered at first start
    assert {a["name"]: a["kind"] for a in listings[-1]["adapters"]} == {
        **examples, "my-lora": "lora", "my-prompt": "prompt", "my-bottleneck": "bottleneck"}
    merged = [json.loads(o) for o in outputs if '"mode":"merged"' in o]
    unmerged = [json.loads(o) for o in outputs if '"mode":"unmerged"' in o and '"adapter":"my-lora"' in o]
    assert merged and unmerged and merged[0]["token_ids"] == unmerged[-1]["token_ids"]
    assert any(o.startswith("[") and "'my-lora'" in o for o in outputs)  # the openai client listed the adapters
    assert any("hotswap_adapter_layer_seconds_count" in o for o in outputs)
    composed = [json.loads(o) for o in outputs if '"kind":"lora+prompt"' in o]
    assert composed and composed[0]["adapter"] == "docstring-lora*0.5+unittest-prompt"
    invoked, plain = [json.loads(o) for o in outputs if '"adapter":"docstring-alora"' in o]
    base = server.generate(prompt="def read_config(path, defaults=None):\n", max_new_tokens=40)
    assert plain["token_ids"] == base["token_ids"] != invoked["token_ids"]  # no invocation: the base model
