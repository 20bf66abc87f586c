"""server/metrics.py: each method moves exactly the series it should; the exposition lints clean."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import (KIND_MODES, KINDS, OTHER_ADAPTER, Metrics, batch_kinds_label,
                            normalize_mode)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def samples(m: Metrics) -> dict[tuple, float]:
    """Every sample of the rendered exposition, keyed by (name, sorted labels); no _created."""
    body, _ = m.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def moved(m: Metrics, action) -> dict[tuple, float]:
    """Run `action` and return the samples that changed or appeared, with their deltas."""
    before = samples(m)
    action()
    after = samples(m)
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)
            or k not in before}


def names(delta: dict) -> set[str]:
    return {name for name, _ in delta}


def hist(delta: dict, name: str, **labels) -> dict[str, float]:
    """A histogram's moved samples with given labels: {'count': .., 'sum': .., 'le=X': ..}."""
    out = {}
    for (n, lbl), v in delta.items():
        d = dict(lbl)
        le = d.pop("le", None)
        if d != labels or not n.startswith(name):
            continue
        suffix = n[len(name):]
        out["le=" + le if suffix == "_bucket" else suffix.lstrip("_")] = v
    return out


def test_series_exist_at_zero_from_start():
    s = samples(Metrics())
    for kind, mode in KIND_MODES:
        assert s[("hotswap_requests_total", (("kind", kind), ("mode", mode), ("status", "ok")))] == 0
        for h in ("request_duration_seconds", "queue_time_seconds", "time_to_first_token_seconds",
                  "time_per_output_token_seconds"):
            assert s[(f"hotswap_{h}_count", (("kind", kind), ("mode", mode)))] == 0
        # adapter time is measured per adapter kind (a combined row counts each): no series that stays empty
        layer = s.get(("hotswap_adapter_layer_seconds_count", (("kind", kind), ("mode", mode))))
        assert layer == (0 if kind in ("lora", "prompt", "bottleneck") else None), (kind, mode)
    for kind in KINDS:
        assert s[("hotswap_generated_tokens_total", (("kind", kind),))] == 0
        assert s[("hotswap_prompt_tokens_total", (("kind", kind),))] == 0
    for kind in ("lora", "prompt", "bottleneck"):
        assert s[("hotswap_adapter_load_seconds_count", (("kind", kind),))] == 0
        assert s[("hotswap_adapters_resident", (("kind", kind),))] == 0
        assert s[("hotswap_adapters_registered", (("kind", kind),))] == 0
    for name in ("hotswap_adapter_merge_seconds_count", "hotswap_adapter_restore_seconds_count",
                 "hotswap_adapter_evictions_total", "hotswap_requests_running",
                 "hotswap_requests_waiting", "hotswap_batch_size_count"):
        assert s[(name, ())] == 0
    assert not any(n == "hotswap_adapter_requests_total" for n, _ in s), "per-adapter is opt-in"


def test_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.evicted()
    assert samples(a)[("hotswap_adapter_evictions_total", ())] == 1
    assert samples(b)[("hotswap_adapter_evictions_total", ())] == 0


def test_request_finished_moves_its_kind_only():
    m = Metrics()
    d = moved(m, lambda: m.request_finished(
        "lora", "unmerged", "ok", duration_s=0.4, queue_s=0.002, ttft_s=0.05, tpot_s=0.012,
        prompt_tokens=7, completion_tokens=8, adapters=("lora1",)))
    assert names(d) == {
        "hotswap_requests_total",
        *(f"hotswap_{h}_{s}" for h in ("request_duration_seconds", "queue_time_seconds",
                                       "time_to_first_token_seconds",
                                       "time_per_output_token_seconds")
          for s in ("bucket", "count", "sum")),
        "hotswap_prompt_tokens_total", "hotswap_generated_tokens_total"}
    lu = (("kind", "lora"), ("mode", "unmerged"))
    assert d[("hotswap_requests_total", lu + (("status", "ok"),))] == 1
    others = {tuple(kv for kv in lbl if kv[0] != "le") for n, lbl in d
              if n != "hotswap_requests_total"}
    assert others == {lu, (("kind", "lora"),)}, "only the lora/unmerged series move"
    tpot = hist(d, "hotswap_time_per_output_token_seconds", kind="lora", mode="unmerged")
    assert tpot["count"] == 1 and tpot["sum"] == pytest.approx(0.012)
    assert "le=0.01" not in tpot and tpot["le=0.015"] == 1 and tpot["le=+Inf"] == 1
    assert d[("hotswap_prompt_tokens_total", (("kind", "lora"),))] == 7
    assert d[("hotswap_generated_tokens_total", (("kind", "lora"),))] == 8


def test_request_finished_skips_missing_timings_and_normalises_mode():
    m = Metrics()
    d = moved(m, lambda: m.request_finished("prompt", "unmerged", "cancelled", duration_s=0.1,
                                            completion_tokens=1))
    assert names(d) == {"hotswap_requests_total", "hotswap_request_duration_seconds_bucket",
                        "hotswap_request_duration_seconds_count",
                        "hotswap_request_duration_seconds_sum", "hotswap_generated_tokens_total"}
    assert d[("hotswap_requests_total",
              (("kind", "prompt"), ("mode", "none"), ("status", "cancelled")))] == 1


def test_request_rejected_counts_status_only():
    m = Metrics()
    d = moved(m, lambda: m.request_rejected("bottleneck", None, "rejected"))
    assert d == {("hotswap_requests_total",
                  (("kind", "bottleneck"), ("mode", "none"), ("status", "rejected"))): 1}


def test_per_adapter_series_are_capped():
    m = Metrics(per_adapter_limit=2)
    for name in ("a", "b", "c", "a", "d"):
        m.request_finished("lora", "merged", duration_s=0.1, adapters=(name,))
    m.request_rejected("lora", "merged", adapters=("e",))
    m.request_finished("base", None, duration_s=0.1)
    per = {dict(lbl)["adapter"]: v for (n, lbl), v in samples(m).items()
           if n == "hotswap_adapter_requests_total"}
    assert per == {"a": 2, "b": 1, OTHER_ADAPTER: 3}


def test_per_adapter_off_by_default():
    m = Metrics()
    d = moved(m, lambda: m.request_finished("lora", "merged", duration_s=0.1, adapters=("a",)))
    assert "hotswap_adapter_requests_total" not in names(d)


def test_step_observes_decode_step_and_batch_size():
    m = Metrics()
    label = "base+bottleneck+lora_unmerged+prompt"
    d = moved(m, lambda: m.step([("prompt", None), ("lora", "unmerged"), ("base", "none"),
                                 ("bottleneck", None), ("base", None)], 0.02, 5))
    assert names(d) == {f"hotswap_{h}_{s}" for h in ("decode_step_seconds", "batch_size")
                        for s in ("bucket", "count", "sum")}
    step = hist(d, "hotswap_decode_step_seconds", batch_kinds=label)
    assert step["count"] == 1 and step["sum"] == pytest.approx(0.02)
    size = hist(d, "hotswap_batch_size")
    assert size["count"] == 1 and size["sum"] == 5 and "le=4.0" not in size and size["le=8.0"] == 1


def test_batch_kinds_label_is_canonical():
    assert batch_kinds_label(["lora_merged"]) == "lora_merged"
    assert batch_kinds_label([("base", None)]) == "base"
    assert batch_kinds_label(["prompt", "base", "prompt"]) == "base+prompt"
    assert batch_kinds_label("base+prompt") == "base+prompt"
    with pytest.raises(ValueError):
        batch_kinds_label([])


def test_adapter_layer_records_zero_for_merged_lora():
    m = Metrics()
    d = moved(m, lambda: m.adapter_layer("lora", "merged", 0.0))
    h = hist(d, "hotswap_adapter_layer_seconds", kind="lora", mode="merged")
    assert h["count"] == 1 and "sum" not in h and h["le=1e-05"] == 1
    assert names(d) == {"hotswap_adapter_layer_seconds_bucket",
                        "hotswap_adapter_layer_seconds_count"}
    d = moved(m, lambda: m.adapter_layer("bottleneck", None, 0.003))
    h = hist(d, "hotswap_adapter_layer_seconds", kind="bottleneck", mode="none")
    assert h["count"] == 1 and h["sum"] == pytest.approx(0.003)


@pytest.mark.parametrize("call, name, labels, delta", [
    (lambda m: m.adapter_loaded("prompt", 0.3), "hotswap_adapter_load_seconds_count",
     (("kind", "prompt"),), 1),
    (lambda m: m.merged(0.01), "hotswap_adapter_merge_seconds_count", (), 1),
    (lambda m: m.restored(0.01), "hotswap_adapter_restore_seconds_count", (), 1),
    (lambda m: m.evicted(), "hotswap_adapter_evictions_total", (), 1),
])
def test_adapter_events(call, name, labels, delta):
    m = Metrics()
    d = moved(m, lambda: call(m))
    assert d[(name, labels)] == delta
    base = name.removesuffix("_count").removesuffix("_total")
    assert {n for n in names(d)} <= {name, f"{base}_sum", f"{base}_bucket"}
    assert all(lbl == labels or dict(lbl).keys() - {"le"} == dict(labels).keys()
               for _, lbl in d)


@pytest.mark.parametrize("call, expected", [
    (lambda m: m.set_registered("lora", 3),
     {("hotswap_adapters_registered", (("kind", "lora"),)): 3}),
    (lambda m: m.set_resident("bottleneck", 2),
     {("hotswap_adapters_resident", (("kind", "bottleneck"),)): 2}),
    (lambda m: m.set_adapter_memory("cuda:0", 4096),
     {("hotswap_adapter_memory_bytes", (("device", "cuda:0"),)): 4096}),
    (lambda m: m.set_queue(3, 5),
     {("hotswap_requests_running", ()): 3, ("hotswap_requests_waiting", ()): 5}),
])
def test_gauges(call, expected):
    m = Metrics()
    assert moved(m, lambda: call(m)) == expected


def test_bad_labels_are_refused():
    m = Metrics()
    with pytest.raises(ValueError, match="kind must be one of"):
        m.request_finished("adapter", None, duration_s=1)
    with pytest.raises(ValueError, match="merged or unmerged"):
        m.adapter_layer("lora", "none", 0.0)
    with pytest.raises(ValueError, match="adapter kind"):
        m.set_resident("base", 1)
    with pytest.raises(ValueError):
        Metrics(per_adapter_limit=-1)
    assert normalize_mode("base", "merged") == "none"


def test_render_content_type_and_names():
    m = Metrics()
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    assert all(n.startswith("hotswap_") for n in m.metric_names())
    for n in m.metric_names():
        assert f"# HELP {n.removesuffix('_total')}" in body.decode()


def test_render_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool is required in CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed")
    m = Metrics(per_adapter_limit=1)
    m.request_finished("lora", "merged", duration_s=0.5, queue_s=0.01, ttft_s=0.1, tpot_s=0.01,
                       prompt_tokens=3, completion_tokens=4, adapters=("x",))
    m.step(["base", "lora_unmerged"], 0.01, 2)
    m.set_adapter_memory("cpu", 1024)
    body, _ = m.render()
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# The Gateway API Inference Extension's model-server protocol (docs/proposals/003-model-server-protocol),
# with vLLM's names: every series a gauge, lora_requests_info with exactly these labels.
GATEWAY_PROTOCOL = {
    "vllm:num_requests_waiting": (),
    "vllm:num_requests_running": (),
    "vllm:kv_cache_usage_perc": (),
    "vllm:lora_requests_info": ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
}


def test_gateway_series_follow_the_protocol():
    from server.metrics import GatewayState

    m = Metrics()
    m.watch_gateway(lambda: GatewayState(running=3, waiting=2, kv_usage=1.5, running_adapters=("a", "b"),
                                         waiting_adapters=("c",), max_lora=8))
    before = time.time()
    body, _ = m.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode()) if f.name.startswith("vllm:")}
    assert set(families) == set(GATEWAY_PROTOCOL)
    for name, labels in GATEWAY_PROTOCOL.items():
        (sample,) = families[name].samples
        assert families[name].type == "gauge" and tuple(sorted(sample.labels)) == labels
    value = {name: f.samples[0].value for name, f in families.items()}
    assert value["vllm:num_requests_running"] == 3 and value["vllm:num_requests_waiting"] == 2
    assert value["vllm:kv_cache_usage_perc"] == 1.0  # a fraction, capped at full
    info = families["vllm:lora_requests_info"].samples[0]
    assert info.labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "c", "max_lora": "8"}
    assert before - 1 <= info.value <= time.time() + 1  # the value is the sample's timestamp
