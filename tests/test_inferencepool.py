"""deploy/inferencepool.yaml: an InferencePool (inference.networking.k8s.io/v1) whose selector and
target port are those of the hotswap pods it routes to, with flags the server accepts."""
from __future__ import annotations

from pathlib import Path

import yaml

from server.__main__ import build_parser
from server.config import Settings

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "inferencepool.yaml"


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_pool_selects_the_hotswap_pods_on_their_port():
    docs = _docs()
    pool, pods = docs["InferencePool"], docs["Deployment"]["spec"]["template"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
    (container,) = pods["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [int(args.port)]
    assert int(args.port) in [p["containerPort"] for p in container["ports"]]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    drain_s = args.shutdown_timeout_s or Settings().shutdown_timeout_s
    assert pods["spec"]["terminationGracePeriodSeconds"] >= drain_s + 10  # the drain, then the exit
    epp = pool["spec"]["endpointPickerRef"]
    assert epp["name"] and 1 <= epp["port"]["number"] <= 65535 and epp["failureMode"] in ("FailOpen", "FailClose")


def test_route_sends_the_openai_api_to_the_pool():
    docs = _docs()
    (rule,) = docs["HTTPRoute"]["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend["kind"] == "InferencePool" and backend["name"] == docs["InferencePool"]["metadata"]["name"]
    assert backend["group"] == "inference.networking.k8s.io"
