"""SIGKILL in the middle of an upload: after a restart on the same store the half upload is gone
(no temporary leftovers) and the adapters stored earlier serve the same outputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import LLAMA, free_port, references, wait_ready
from tests.store.helpers import (
    BOUNDARY,
    PROMPT,
    folder_files,
    multipart_head,
    multipart_tail,
    upload,
)

ROOT = Path(__file__).resolve().parents[2]
PEFT = references("peft", "tiny-llama")


def _start(store: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(LLAMA), "--store", str(store), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def _outputs(url: str, adapter: str) -> list[list[int]]:
    with httpx.Client(base_url=url, timeout=60) as c:
        return [c.post("/generate", params={"adapter": adapter},
                       json={"prompt_token_ids": p, "max_new_tokens": 12}).json()["token_ids"] for p in PEFT["prompts"]]


def _temp_folders(store: Path) -> list[Path]:
    return [p for p in store.iterdir() if p.name.startswith(".")]


def test_sigkill_during_upload_leaves_no_trace(tmp_path):
    store, port, log = tmp_path / "store", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    proc = _start(store, port, log)
    try:
        wait_ready(url, lambda: proc.poll() is None)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert upload(c, "kept", files=folder_files(PROMPT)).status_code == 201
        before = _outputs(url, "kept")
        assert before == PEFT["adapters"]["prompt-16"]["outputs"]

        weights = (PROMPT / "adapter_model.safetensors").read_bytes()
        gate, outcome = threading.Event(), {}

        def half_then_wait():
            yield multipart_head("half", "adapter_model.safetensors")
            yield weights[: len(weights) // 2]
            gate.wait(60)
            yield weights[len(weights) // 2:] + multipart_tail()

        def post():
            try:
                outcome["r"] = httpx.post(f"{url}/adapters", content=half_then_wait(), timeout=60,
                                          headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
            except httpx.TransportError as exc:
                outcome["error"] = exc

        sender = threading.Thread(target=post)
        sender.start()
        deadline = time.monotonic() + 30
        partial = None
        while partial is None and time.monotonic() < deadline:
            partial = next((f for t in _temp_folders(store) for f in t.rglob("adapter_model.safetensors")
                            if f.stat().st_size > 0), None)
            time.sleep(0.02)
        assert partial is not None, "the upload never reached the store's temporary folder"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        gate.set()
        sender.join(60)
        assert "error" in outcome  # the connection died with the server
        assert _temp_folders(store), "the half upload should still be on disk after the kill"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc = _start(store, port, log)
    try:
        wait_ready(url, lambda: proc.poll() is None)
        assert _temp_folders(store) == []
        assert sorted(p.name for p in store.iterdir()) == ["kept"]
        with httpx.Client(base_url=url, timeout=60) as c:
            assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["kept"]
            assert c.get("/adapters/half").status_code == 404
        assert _outputs(url, "kept") == before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
