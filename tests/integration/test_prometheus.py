"""The real thing: `python -m server` scraped by a real Prometheus; every dashboard expr has data.

Starts the server (tiny-llama with a LoRA, a soft prompt and a bottleneck adapter) and the Debian
`prometheus` binary as subprocesses, sends requests of every kind, then evaluates each expr of
deploy/grafana/dashboards/hotswap.json through Prometheus' HTTP API.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TLS

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hotswap.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVER_START_S = 180
PROMETHEUS_START_S = 60
SCRAPE_INTERVAL_S = 1
# The fixtures' reference prompt: no kind emits EOS (id 0) in its first 8 greedy tokens.
PROMPT = [5, 17, 301, 42, 999, 7, 12]

# (query adapter, body extras, expected kind, expected mode)
KIND_REQUESTS = [
    (None, {}, "base", None),
    ("lora1", {"mode": "merged"}, "lora", "merged"),
    ("lora1", {"mode": "unmerged"}, "lora", "unmerged"),
    ("soft", {}, "prompt", None),
    ("bn", {}, "bottleneck", None),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL; bounded."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd: list[str], log: Path, request) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    request.addfinalizer(lambda: stop(proc))
    return proc


def wait_until_ok(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before {url} was ready:\n"
                        f"{log_tail(log)}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {timeout_s} s ({last}):\n{log_tail(log)}")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if IN_CI:
            pytest.fail("the prometheus binary is required in CI (Debian package `prometheus`)")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def server_url(request, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("hotswap")
    port = free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "server",
           "--model", str(FIXTURES / "tiny-llama"),
           "--store", str(tmp / "store"),
           "--host", "127.0.0.1", "--port", str(port),
           "--adapter", f"lora1={FIXTURES / 'peft/tiny-llama/lora-qv-r8'}",
           "--adapter", f"soft={FIXTURES / 'peft/tiny-llama/prompt-16'}",
           "--adapter", f"bn={FIXTURES / 'adapterhub/tiny-llama/seq_bn-rf16'}"]
    proc = start(cmd, log, request)
    url = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{url}/ready", proc, log, SERVER_START_S)
    return url


@pytest.fixture(scope="module")
def prometheus_url(request, tmp_path_factory, prometheus_bin, server_url) -> str:
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    target = server_url.removeprefix("http://")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        "  - job_name: hotswap\n"
        f"    scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    log = tmp / "prometheus.log"
    proc = start([prometheus_bin, f"--config.file={config}",
                  f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}"], log, request)
    url = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{url}/-/ready", proc, log, PROMETHEUS_START_S)
    deadline = time.monotonic() + 30
    while query(url, 'up{job="hotswap"} == 1') == []:
        if time.monotonic() > deadline:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=5).text
            pytest.fail(f"Prometheus never scraped the server: {targets}\n{log_tail(log)}")
        time.sleep(0.5)
    return url


def query(prometheus: str, expr: str) -> list:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
    return body["data"]["result"]


def dashboard_exprs() -> list[str]:
    def walk(panels):
        for p in panels:
            yield from (t["expr"] for t in p.get("targets", []) if t.get("expr"))
            yield from walk(p.get("panels", []))
    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def generate(url: str, adapter: str | None, extra: dict) -> dict:
    params = {"adapter": adapter} if adapter else {}
    body = {"prompt_token_ids": PROMPT, "max_new_tokens": 8, "temperature": 0, **extra}
    r = httpx.post(f"{url}/generate", params=params, json=body, timeout=120, verify=TLS)
    assert r.status_code == 200, f"{adapter} {extra}: HTTP {r.status_code} {r.text}"
    return r.json()


@pytest.mark.timeout(600)
def test_every_dashboard_expr_has_data(server_url, prometheus_url):
    # Each kind alone, then all kinds at once (mixed batches and a merged phase).
    for adapter, extra, kind, mode in KIND_REQUESTS:
        out = generate(server_url, adapter, extra)
        assert out["kind"] == kind, out
        if mode:
            assert out["mode"] == mode, out
        assert out["usage"]["completion_tokens"] >= 1
    with ThreadPoolExecutor(max_workers=len(KIND_REQUESTS) * 2) as pool:
        jobs = [pool.submit(generate, server_url, a, e) for a, e, _, _ in KIND_REQUESTS * 2]
        for job in jobs:
            job.result(timeout=180)
    sent = len(KIND_REQUESTS) * 3

    metrics = httpx.get(f"{server_url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")

    # Prometheus has seen every request, then a few more scrapes so each rate() has 2+ points.
    deadline = time.monotonic() + 30
    while True:
        seen = query(prometheus_url, "sum(hotswap_requests_total)")
        if seen and float(seen[0]["value"][1]) >= sent:
            break
        assert time.monotonic() < deadline, f"Prometheus saw {seen} requests, {sent} sent"
        time.sleep(SCRAPE_INTERVAL_S)
    time.sleep(3 * SCRAPE_INTERVAL_S)

    exprs = dashboard_exprs()
    assert exprs
    empty = []
    deadline = time.monotonic() + 20
    for expr in exprs:
        while not query(prometheus_url, expr):
            if time.monotonic() > deadline:
                empty.append(expr)
                break
            time.sleep(SCRAPE_INTERVAL_S)
    assert not empty, "dashboard exprs without data:\n" + "\n".join(empty)

    # Every kind/mode actually counted, as the dashboard's per-kind panels need.
    per_kind = {(r["metric"]["kind"], r["metric"]["mode"]): float(r["value"][1]) for r in query(
        prometheus_url, "sum by (kind, mode) (hotswap_requests_total)")}
    for _, _, kind, mode in KIND_REQUESTS:
        assert per_kind.get((kind, mode or "none"), 0) >= 3, per_kind
    # Per-token latency per kind, and adapter-layer time for the kinds the overhead panels
    # compare (merged LoRA records its zero), were really observed, not just pre-created.
    for metric, pairs in (
            ("hotswap_time_per_output_token_seconds_count",
             [(k, m or "none") for _, _, k, m in KIND_REQUESTS]),
            ("hotswap_adapter_layer_seconds_count",
             [("lora", "merged"), ("lora", "unmerged"), ("bottleneck", "none")])):
        counts = {(r["metric"]["kind"], r["metric"]["mode"]): float(r["value"][1]) for r in query(
            prometheus_url, f"sum by (kind, mode) ({metric})")}
        missing = [p for p in pairs if counts.get(p, 0) < 1]
        assert not missing, f"{metric}: no observations for {missing} ({counts})"
    steps = query(prometheus_url, "sum by (batch_kinds) (hotswap_decode_step_seconds_count)")
    assert {r["metric"]["batch_kinds"] for r in steps} >= {"base", "lora_merged"}, steps
