"""Drive one scenario against a server: register its adapters, warm up, fire, scrape, summarise."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from load_tests.client import GenerateRequest, HotswapClient
from load_tests.layout import BenchLayout
from load_tests.scenarios import Scenario
from load_tests.scrape import ServerMetrics
from load_tests.stats import RequestResult, ScenarioResult, summarize

READY_POLL_S = 0.5


async def wait_ready(client: HotswapClient, timeout_s: float, exit_code: Callable[[], int | None]) -> None:
    """Poll GET /ready; fail early if the server process has exited."""
    deadline = time.monotonic() + timeout_s
    while not await client.is_ready():
        if (code := exit_code()) is not None:
            raise RuntimeError(f"server exited with code {code} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not ready after {timeout_s:.0f}s")
        await asyncio.sleep(READY_POLL_S)


async def register_missing(client: HotswapClient, layout: BenchLayout, names: Sequence[str]) -> list[str]:
    """Upload, from the bench folder, each adapter the server does not know; return those uploaded."""
    uploaded = []
    for name in sorted(names):
        if await client.has_adapter(name):
            continue
        folder = layout.adapter_dir(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing; run `python -m load_tests.build_bench_model --churn`")
        await client.upload_adapter(name, folder)
        uploaded.append(name)
    return uploaded


async def send_together(client: HotswapClient, requests: Sequence[GenerateRequest]) -> list[RequestResult]:
    return list(await asyncio.gather(*(client.generate(r) for r in requests)))


async def run_scenario(client: HotswapClient, scenario: Scenario, rounds: int) -> ScenarioResult:
    """Send the scenario's requests all at once, `rounds` times back to back (after one short warm-up);
    GET /metrics just before and after the timed rounds."""
    if scenario.warm:
        await send_together(client, scenario.warmup_requests())
    before = await client.metrics_text()
    results: list[RequestResult] = []
    started = time.perf_counter()
    for _ in range(rounds):
        results += await send_together(client, scenario.requests)
    wall_s = time.perf_counter() - started
    server = ServerMetrics.between(before, await client.metrics_text())
    return summarize(scenario.name, scenario.concurrency, results, wall_s, server)
