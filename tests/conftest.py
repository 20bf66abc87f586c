"""Shared test fixtures: paths to the tiny models and adapters, and a live server in a thread."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before any kernel is decorated: Triton's kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.config import Settings
from server.http import Server, uvicorn_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LLAMA = FIXTURES / "tiny-llama"
GPT2 = FIXTURES / "tiny-gpt2"
TLS = ssl.create_default_context()  # one for every test client: httpx builds a new one (~40 ms) per client


def references(kind: str, base: str) -> dict:
    """kind: 'peft' or 'adapterhub'; base: 'tiny-llama' or 'tiny-gpt2'."""
    return json.loads((FIXTURES / kind / base / "references.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    server: uvicorn.Server

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, verify=TLS, **kwargs)

    def generate(self, adapter: str | None = None, **body) -> dict:
        params = {"adapter": adapter} if adapter else {}
        with self.client() as c:
            r = c.post("/generate", params=params, json=body)
        assert r.status_code == 200, r.text
        return r.json()


@contextmanager
def live_server(tmp_path: Path, as_main: bool = False, **overrides) -> Iterator[LiveServer]:
    """as_main: served as `python -m server` serves (header timeout, drain on shutdown)."""
    port = free_port()
    settings = Settings(**{"host": "127.0.0.1", "port": port, "store": tmp_path / "store", **overrides})
    app = create_app(settings)
    if as_main:
        server = Server(uvicorn_config(app, settings, log_level="warning"), app)
    else:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, thread.is_alive)
        yield LiveServer(url, app, server)
    finally:
        server.should_exit = True
        thread.join(60)


def wait_ready(url: str, alive: Callable[[], bool], timeout_s: float = 120) -> None:
    """Poll GET /ready until 200; fail early if the server (thread or process) died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for {url} died during start-up")
        try:
            if httpx.get(f"{url}/ready", timeout=2, verify=TLS).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("llama"), model=LLAMA, max_batch_size=32) as srv:
        yield srv


@pytest.fixture(scope="module")
def gpt2_server(tmp_path_factory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("gpt2"), model=GPT2) as srv:
        yield srv
