"""hotswap on Ray Serve: two replicas of the tiny Llama on a local Ray cluster, one shared store.

The cluster runs as users run it (`python -m server.cluster`, a subprocess that starts Ray); the
tests speak HTTP to its ingress and read `x-hotswap-replica` to see which replica answered.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import FIXTURES, LLAMA, free_port, references, wait_ready
from tests.integration.test_prometheus import prometheus_bin, query, start, wait_until_ok  # noqa: F401 (fixture)

pytest.importorskip("ray.serve")

REPLICA = "x-hotswap-replica"
PROMETHEUS_CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "prometheus-cluster.yml"
ADAPTERS = {  # name -> (folder, its references.json)
    "lora-qv-r8": (FIXTURES / "peft" / "tiny-llama" / "lora-qv-r8", "peft"),
    "lora-all-r16": (FIXTURES / "peft" / "tiny-llama" / "lora-all-r16", "peft"),
    "prompt-16": (FIXTURES / "peft" / "tiny-llama" / "prompt-16", "peft"),
    "seq_bn-rf16": (FIXTURES / "adapterhub" / "tiny-llama" / "seq_bn-rf16", "adapterhub"),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """URL of a 2-replica cluster with the 4 adapters uploaded once, through the ingress."""
    root = tmp_path_factory.mktemp("cluster")
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "server.cluster", "--replicas", "2", "--replica-cpus", "0.5", "--threads", "1",
           "--model", str(LLAMA), "--store", str(root / "store"), "--port", str(port),
           "--metrics-port", str(metrics_port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=(root / "log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, lambda: proc.poll() is None, timeout_s=300)  # one replica is enough for /ready
        _wait_for_replicas(metrics_port, 2, timeout_s=300)
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, (folder, _) in ADAPTERS.items():
                files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
                assert client.post("/adapters", data={"name": name}, files=files).status_code == 201
        yield url, metrics_port
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def _wait_for_replicas(metrics_port: int, n: int, timeout_s: float) -> None:
    """Until all n replicas are up: each opens its metrics port once its app is ready."""
    deadline = time.monotonic() + timeout_s
    for port in range(metrics_port, metrics_port + n):
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"replica with metrics port {port} never came up"
            time.sleep(0.5)


def _generate(url: str, adapter: str, prompt: list[int], n: int = 12, **extra) -> httpx.Response:
    body = {"prompt_token_ids": prompt, "max_new_tokens": n, **extra}
    return httpx.post(f"{url}/generate", params={"adapter": adapter} if adapter else {}, json=body, timeout=120)


def _expected(name: str) -> list[list[int]]:
    _, kind = ADAPTERS[name]
    return references(kind, "tiny-llama")["adapters"][name]["outputs"]


def _replicas_answering(url: str, path: str, tries: int = 16, replicas: int = 2,
                        timeout_s: float = 60.0) -> dict[str, set[int]]:
    """replica id -> the statuses it gave, over at least `tries` GETs and until `replicas` replicas
    have answered (Ray's router spreads requests over the replicas it knows of, and may send a
    first few to one alone) or `timeout_s` has passed."""
    seen: dict[str, set[int]] = defaultdict(set)
    deadline = time.monotonic() + timeout_s
    asked = 0
    while asked < tries or (len(seen) < replicas and time.monotonic() < deadline):
        r = httpx.get(f"{url}{path}", timeout=30)
        seen[r.headers[REPLICA]].add(r.status_code)
        asked += 1
    return dict(seen)


def test_upload_once_visible_on_both_replicas(cluster):
    url, _ = cluster
    seen = _replicas_answering(url, "/adapters/seq_bn-rf16")
    assert len(seen) == 2 and all(statuses == {200} for statuses in seen.values()), seen


def test_requests_follow_their_adapter_and_equal_the_single_server(cluster):
    url, _ = cluster
    prompts = references("peft", "tiny-llama")["prompts"]
    for name in ADAPTERS:  # first use loads each adapter on some replica; Ray learns where
        assert _generate(url, name, prompts[0]).status_code == 200
    time.sleep(3)
    jobs = [(name, i % len(prompts)) for name in ADAPTERS for i in range(10)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: _generate(url, job[0], prompts[job[1]]), jobs))
    replicas_of = defaultdict(set)
    for (name, i), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == _expected(name)[i], (name, i)
        replicas_of[name].add(r.headers[REPLICA])
    assert all(len(ids) == 1 for ids in replicas_of.values()), dict(replicas_of)


def test_openai_model_routes_like_the_query_and_streams_equal_the_json(cluster):
    url, _ = cluster
    prompt = references("peft", "tiny-llama")["prompts"][1]
    plain = _generate(url, "seq_bn-rf16", prompt)
    body = {"model": "seq_bn-rf16", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    completion = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert completion.headers[REPLICA] == plain.headers[REPLICA]
    assert completion.json()["choices"][0]["text"] == plain.json()["text"]
    lorax = {"inputs": "def", "parameters": {"adapter_id": "seq_bn-rf16", "max_new_tokens": 2}}
    for path in ("/", "/generate", "/generate_stream"):  # LoRAX's bodies route by parameters.adapter_id
        r = httpx.post(f"{url}{path}", json=lorax, timeout=60)
        assert r.status_code == 200 and r.headers[REPLICA] == plain.headers[REPLICA], (path, r.text)
    with httpx.stream("POST", f"{url}/generate", params={"adapter": "seq_bn-rf16"}, timeout=60,
                      json={"prompt_token_ids": prompt, "max_new_tokens": 12, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["token_id"] for e in events[:-1]] == events[-1]["token_ids"] == _expected("seq_bn-rf16")[1]


def test_every_method_and_the_api_description_are_the_servers(cluster):
    url, _ = cluster
    assert "/v1/completions" in httpx.get(f"{url}/openapi.json").json()["paths"]
    for method in ("HEAD", "OPTIONS"):
        r = httpx.request(method, f"{url}/generate")
        assert r.status_code == 405 and r.headers[REPLICA], (method, r.status_code, r.text)


def test_each_replica_exports_its_metrics(cluster):
    _, metrics_port = cluster
    for port in (metrics_port, metrics_port + 1):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "hotswap_adapters_registered" in text


def test_delete_through_one_replica_is_seen_by_both_and_in_flight_finishes(cluster):
    url, _ = cluster
    prompt = references("peft", "tiny-llama")["prompts"][0]
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(_generate, url, "lora-qv-r8", prompt, 400, ignore_eos=True)
        time.sleep(1.0)
        assert httpx.delete(f"{url}/adapters/lora-qv-r8", timeout=30).status_code == 200
        finished = long.result()
    assert finished.status_code == 200 and len(finished.json()["token_ids"]) == 400
    assert all(_generate(url, "lora-qv-r8", prompt).status_code == 404 for _ in range(4))
    seen = _replicas_answering(url, "/adapters/lora-qv-r8")
    assert len(seen) == 2 and all(statuses == {404} for statuses in seen.values()), seen


def _replica_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split()[1:2] == ["ray::ServeReplica:hotswap:Replica"]]


def test_killed_replica_is_restarted_and_only_its_in_flight_requests_fail(cluster):
    url, _ = cluster
    prompts = references("peft", "tiny-llama")["prompts"]
    pids = _replica_pids()
    assert len(pids) == 2
    jobs = [("" if i % 3 == 0 else "prompt-16", i % len(prompts)) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(_generate, url, name, prompts[i], 60, ignore_eos=True) for name, i in jobs]
        time.sleep(1.5)
        os.kill(pids[0], signal.SIGKILL)
        responses = [f.result() for f in futures]
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "replica_unavailable" and r.headers["retry-after"]
    assert statuses.count(200) >= 1
    after = [_generate(url, name, prompts[0]) for name in ("", "prompt-16", "seq_bn-rf16")]
    assert [r.status_code for r in after] == [200, 200, 200]
    assert after[1].json()["token_ids"] == _expected("prompt-16")[0]
    deadline = time.monotonic() + 240  # a restart loads torch and the model anew: slow when the 2 cores are busy
    restarted = _replica_pids()
    while (len(restarted) < 2 or pids[0] in restarted) and time.monotonic() < deadline:  # the killed one may
        time.sleep(1)  # still be listed until it is reaped
        restarted = _replica_pids()
    assert len(restarted) == 2 and pids[0] not in restarted


def test_prometheus_scrapes_every_replica(cluster, prometheus_bin, request, tmp_path):
    """Real Prometheus, deploy/prometheus-cluster.yml's job with this cluster's ports: both replicas up."""
    _, metrics_port = cluster
    config = yaml.safe_load(PROMETHEUS_CLUSTER.read_text())
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port + k}" for k in (0, 1)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = start([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                  f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                 tmp_path / "prometheus.log", request)
    url = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{url}/-/ready", proc, tmp_path / "prometheus.log", 60)
    deadline = time.monotonic() + 60
    while query(url, 'count(up{job="hotswap-replicas"} == 1) == 2') == [] and time.monotonic() < deadline:
        time.sleep(0.5)
    per_replica = query(url, 'sum by (instance) (hotswap_adapters_registered{job="hotswap-replicas"})')
    assert len(per_replica) == 2
