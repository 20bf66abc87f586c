"""The bench's HTTP client: streamed `POST /generate` timed token by token, and adapter upload."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from load_tests.scrape import row_kind
from load_tests.sse import EventKind, SseDecoder, classify, tokens_in
from load_tests.stats import RequestResult

Mode = Literal["merged", "unmerged"]


class _HttpStatus(Exception):
    """A non-200 answer to /generate, already described."""


@dataclass(frozen=True)
class GenerateRequest:
    adapter: str | None  # None: the base model
    prompt_token_ids: list[int]
    max_new_tokens: int
    mode: Mode | None = None  # LoRA only
    adapters: tuple[tuple[str, float], ...] = ()  # several adapters combined, (name, weight) each; adapter None

    def params(self) -> dict[str, str]:
        return {} if self.adapter is None else {"adapter": self.adapter}

    def body(self, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt_token_ids": self.prompt_token_ids,
            "max_new_tokens": self.max_new_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if self.mode is not None:
            body["mode"] = self.mode
        if self.adapters:
            body["adapters"] = [{"name": name, "weight": weight} for name, weight in self.adapters]
        return body


class StreamRecorder:
    """Turns timestamped stream events into one request's measurements."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._last_token_at: float | None = None
        self._result = RequestResult()
        self._finished = False

    def on_event(self, event: dict[str, Any], now: float) -> None:
        kind = classify(event)
        if kind is EventKind.ERROR:
            self._result.error = f"stream error: {json.dumps(event['error'])}"
        elif kind is EventKind.TOKEN:
            self._on_tokens(tokens_in(event), now)
        else:
            self._on_final(event, now)

    def _on_tokens(self, count: int, now: float) -> None:
        if self._last_token_at is None:
            self._result.ttft_s = now - self._started
        else:
            gap = (now - self._last_token_at) / count
            self._result.token_gaps_s.extend([gap] * count)
        self._last_token_at = now
        self._result.completion_tokens += count

    def _on_final(self, event: dict[str, Any], now: float) -> None:
        if self._result.ttft_s is None:
            self._result.ttft_s = now - self._started
        self._result.e2e_s = now - self._started
        usage = event.get("usage") or {}
        self._result.completion_tokens = int(usage.get("completion_tokens", self._result.completion_tokens))
        if event.get("kind"):
            self._result.kind = row_kind(event["kind"], event.get("mode"))
        self._finished = True

    def result(self) -> RequestResult:
        if self._result.error is None and not self._finished:
            self._result.error = "stream ended without a final event"
        return self._result


def describe_error_response(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return f"HTTP {status} {error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


class HotswapClient:
    def __init__(self, base_url: str, timeout_s: float = 600.0, transport: httpx.AsyncBaseTransport | None = None):
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=128),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, request: GenerateRequest) -> RequestResult:
        started = time.perf_counter()
        recorder = StreamRecorder(started)
        try:
            await self._stream_into(recorder, request)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            return RequestResult(error=f"{type(exc).__name__}: {exc}")
        except _HttpStatus as exc:
            return RequestResult(error=str(exc))
        return recorder.result()

    async def _stream_into(self, recorder: StreamRecorder, request: GenerateRequest) -> None:
        async with self._http.stream("POST", "/generate", params=request.params(), json=request.body()) as response:
            if response.status_code != 200:
                raise _HttpStatus(describe_error_response(response.status_code, await response.aread()))
            decoder = SseDecoder()
            async for line in response.aiter_lines():
                for event in decoder.feed(line):
                    recorder.on_event(event, time.perf_counter())
            for event in decoder.close():
                recorder.on_event(event, time.perf_counter())

    async def is_ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def metrics_text(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        response = await self._http.get("/metrics")
        if response.status_code != 200:
            raise RuntimeError(f"GET /metrics: {describe_error_response(response.status_code, response.content)}")
        return response.text

    async def has_adapter(self, name: str) -> bool:
        response = await self._http.get(f"/adapters/{name}")
        if response.status_code not in (200, 404):
            raise RuntimeError(describe_error_response(response.status_code, response.content))
        return response.status_code == 200

    async def upload_adapter(self, name: str, folder: Path) -> None:
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
        response = await self._http.post("/adapters", data={"name": name}, files=files)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"upload of {name}: {describe_error_response(response.status_code, response.content)}")

