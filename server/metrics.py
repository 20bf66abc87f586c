"""Every Prometheus metric the server exports, namespaced `hotswap_`, documented, in one place.

One `Metrics` object per app owns its own `CollectorRegistry`, so tests and several apps in one
process never clash. The engine and the routers call the small typed methods below; nothing else
touches prometheus_client. GET /metrics serves `Metrics.render()`.

Labels are bounded sets:
- `kind`: base | lora | prompt | bottleneck, or a request's combination of adapters (its `adapters`
  list): lora+prompt | lora+bottleneck | prompt+bottleneck | lora+prompt+bottleneck (weighted LoRAs
  alone are one LoRA: lora)
- `mode`: merged | unmerged for LoRA; none for every other kind (normalised here, so callers may
  pass the request's mode as it is)
- `status`: ok | cancelled | error for finished requests; rejected (or the refusal's reason) for
  requests turned away before running
- `batch_kinds`: the sorted, '+'-joined set of row kinds in one decode step, e.g.
  `base+bottleneck+lora_unmerged+prompt` (see `batch_kinds_label`)
- `adapter`: only when opted in with `per_adapter_limit`, capped, the rest under `__other__`
- `method`, `route`, `code` (HTTP responses): the app's methods, route templates (`unmatched` for a path
  no route has) and status codes

Beside them, the series the Kubernetes Gateway API Inference Extension (and llm-d) route by, with
vLLM's names and meaning (docs/proposals/003-model-server-protocol), read from the engine and the
registry at each scrape (`watch_gateway`):
- `vllm:num_requests_waiting`, `vllm:num_requests_running`: gauges, requests queued (or waiting for
  their adapter's resident slot) / in the batch;
- `vllm:kv_cache_usage_perc`: gauge, 0..1 (1 = full, as vLLM): the KV positions the running rows
  reserve (prompt + max_new_tokens each) over `--max-batch-tokens`, what admission is bounded by;
- `vllm:lora_requests_info`: gauge whose value is the time of the scrape (as vLLM's, so the newest
  sample wins), labels `running_lora_adapters` (comma-separated: adapters resident on the device,
  ready to serve, the protocol's definition, and those of running rows), `waiting_lora_adapters`
  (adapters of queued requests and of those waiting for a slot), `max_lora` (resident slots, `--max-resident-adapters`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

COMBINED_KINDS = ("lora+prompt", "lora+bottleneck", "prompt+bottleneck", "lora+prompt+bottleneck")
KINDS = ("base", "lora", "prompt", "bottleneck", *COMBINED_KINDS)
ADAPTER_KINDS = ("lora", "prompt", "bottleneck")
MODES = ("merged", "unmerged", "none")
# The (kind, mode) pairs that can occur; their series exist at 0 from the start.
KIND_MODES = tuple((kind, mode) for kind in KINDS
                   for mode in (("merged", "unmerged") if "lora" in kind.split("+") else ("none",)))
OTHER_ADAPTER = "__other__"

# Whole requests on CPU take tens of ms to minutes; on GPU a few ms to seconds.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Queueing and time to first token: sub-ms when idle, seconds under load.
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
# Per output token and per decode step: ~1-20 ms on GPU, ~5-200 ms on CPU.
TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                 0.1, 0.2, 0.5, 1.0, 2.0)
# Adapter computation inside one decode step: 0 (merged LoRA) to a few ms.
LAYER_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                 0.025, 0.05, 0.1)
# Loading, merging, restoring adapters.
ADMIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def normalize_mode(kind: str, mode: str | None) -> str:
    """The `mode` label for a request of `kind`: merged|unmerged for LoRA, none otherwise."""
    if kind not in KINDS:
        raise ValueError(f"metrics: kind must be one of {KINDS}, got {kind!r}")
    if "lora" not in kind.split("+"):
        return "none"
    if mode not in ("merged", "unmerged"):
        raise ValueError(f"metrics: a LoRA request's mode must be merged or unmerged, got {mode!r}")
    return mode


def batch_kind(kind: str, mode: str | None = None) -> str:
    """One row's token in `batch_kinds`: `lora_merged`, `lora_unmerged`, or the kind itself."""
    mode = normalize_mode(kind, mode)
    return f"{kind}_{mode}" if kind == "lora" else kind


def batch_kinds_label(kinds: str | Iterable[str | tuple[str, str | None]]) -> str:
    """Canonical `batch_kinds` value: the set of row tokens, sorted, joined by '+'.

    Accepts a ready label (returned as given), or an iterable of tokens (`base`, `lora_merged`, ...)
    or of (kind, mode) pairs, one per row; duplicates collapse.
    """
    if isinstance(kinds, str):
        return kinds
    tokens = {batch_kind(*k) if isinstance(k, tuple) else k for k in kinds}
    if not tokens:
        raise ValueError("metrics: a decode step needs at least one row kind, got none")
    return "+".join(sorted(tokens))


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, per_adapter_limit: int = 0) -> None:
        if per_adapter_limit < 0:
            raise ValueError(f"metrics: per_adapter_limit must be >= 0, got {per_adapter_limit}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.per_adapter_limit = per_adapter_limit
        self._adapters_seen: set[str] = set()
        self._lock = threading.Lock()
        self._define()
        self._precreate()

    # -- definitions -------------------------------------------------------------------------

    def _define(self) -> None:
        r = self.registry
        km = ("kind", "mode")
        self.requests = Counter(
            "hotswap_requests_total",
            "Generation requests that ended, by adapter kind, LoRA mode and status "
            "(ok, cancelled, error, rejected: refused by a full queue, 429).", ("kind", "mode", "status"),
            registry=r)
        self.request_duration = Histogram(
            "hotswap_request_duration_seconds",
            "Time from a request's arrival to its last token.", km,
            buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "hotswap_queue_time_seconds",
            "Time a request waited before it joined a batch.", km,
            buckets=WAIT_BUCKETS, registry=r)
        self.ttft = Histogram(
            "hotswap_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.", km,
            buckets=WAIT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "hotswap_time_per_output_token_seconds",
            "Mean time per generated token after the first, one observation per request.", km,
            buckets=TOKEN_BUCKETS, registry=r)
        self.adapter_layer_time = Histogram(
            "hotswap_adapter_layer_seconds",
            "Time per decode step spent in adapter computation, by kind (merged LoRA records 0).",
            km, buckets=LAYER_BUCKETS, registry=r)
        self.decode_step = Histogram(
            "hotswap_decode_step_seconds",
            "Wall time of one decode step, by the sorted set of row kinds in the batch.",
            ("batch_kinds",), buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "hotswap_batch_size",
            "Rows in one decode step.", buckets=BATCH_BUCKETS, registry=r)
        self.adapter_load = Histogram(
            "hotswap_adapter_load_seconds",
            "Time to read, validate and place one adapter's weights on the device.", ("kind",),
            buckets=ADMIN_BUCKETS, registry=r)
        self.adapter_merge = Histogram(
            "hotswap_adapter_merge_seconds",
            "Time to fold one LoRA adapter into the base weights.",
            buckets=ADMIN_BUCKETS, registry=r)
        self.adapter_restore = Histogram(
            "hotswap_adapter_restore_seconds",
            "Time to restore the pristine base weights after a merged phase.",
            buckets=ADMIN_BUCKETS, registry=r)
        self.adapters_registered = Gauge(
            "hotswap_adapters_registered",
            "Adapters known to the server (in the store or loaded from disk), by kind.",
            ("kind",), registry=r)
        self.adapters_resident = Gauge(
            "hotswap_adapters_resident",
            "Adapters whose weights are on the device now, by kind.", ("kind",), registry=r)
        self.adapter_memory = Gauge(
            "hotswap_adapter_memory_bytes",
            "Bytes held by resident adapter weights and the combinations of them kept for reuse, by device.",
            ("device",), registry=r)
        self.requests_running = Gauge(
            "hotswap_requests_running",
            "Requests in the running batch: decoding, or prefilling a long prompt in chunks.", registry=r)
        self.requests_waiting = Gauge(
            "hotswap_requests_waiting",
            "Requests admitted but waiting for a batch slot or their merged phase.", registry=r)
        self.kv_cache = Gauge(
            "hotswap_kv_cache_bytes",
            "KV-cache memory: `used` by the blocks rows hold now, `cached` by prompt blocks kept for later "
            "requests (evicted when the pool needs room), `allocated` for the whole block pool.",
            ("state",), registry=r)
        self.evictions = Counter(
            "hotswap_adapter_evictions_total",
            "Adapters evicted from the device to make room for another.", registry=r)
        self.prompt_tokens = Counter(
            "hotswap_prompt_tokens_total",
            "Prompt tokens of finished requests, by kind (a soft prompt's virtual tokens included, as "
            "responses' usage counts them).", ("kind",), registry=r)
        self.cached_prompt_tokens = Counter(
            "hotswap_prompt_cached_tokens_total",
            "Prompt tokens of finished requests whose KV came from the prompt cache, not computed, by kind.",
            ("kind",), registry=r)
        self.generated_tokens = Counter(
            "hotswap_generated_tokens_total",
            "Generated tokens of finished requests, by kind.", ("kind",), registry=r)
        self.http_responses = Counter(
            "hotswap_http_responses_total",
            "HTTP responses by method, route (its path template; unmatched: no route) and status code "
            "(499: the client left before an answer): refusals at the door included.",
            ("method", "route", "code"), registry=r)
        self.adapter_requests = Counter(
            "hotswap_adapter_requests_total",
            "Requests per adapter name; opt-in and capped, the rest counted as __other__.",
            ("adapter",), registry=r)

    def _precreate(self) -> None:
        """Make every bounded label combination exist at 0, so rates and ratios have data."""
        for kind, mode in KIND_MODES:
            self.requests.labels(kind, mode, "ok")
            for h in (self.request_duration, self.queue_time, self.ttft, self.tpot):
                h.labels(kind, mode)
            # adapter time is measured per adapter kind (a row that combines kinds counts each; base rows none)
            if kind in ADAPTER_KINDS:
                self.adapter_layer_time.labels(kind, mode)
        for kind in KINDS:
            self.prompt_tokens.labels(kind)
            self.cached_prompt_tokens.labels(kind)
            self.generated_tokens.labels(kind)
        for kind in ADAPTER_KINDS:
            self.adapter_load.labels(kind)
            self.adapters_registered.labels(kind)
            self.adapters_resident.labels(kind)
        self.requests_running.set(0)
        self.requests_waiting.set(0)

    # -- requests ----------------------------------------------------------------------------

    def request_finished(self, kind: str, mode: str | None, status: str = "ok", *,
                         duration_s: float, queue_s: float | None = None,
                         ttft_s: float | None = None, tpot_s: float | None = None,
                         prompt_tokens: int = 0, cached_tokens: int = 0, completion_tokens: int = 0,
                         adapters: tuple[str, ...] = ()) -> None:
        """A request ran and ended (ok, cancelled or error). Timings left None are not observed
        (e.g. `tpot_s` for a request that generated fewer than two tokens). `adapters`: the registered
        adapters it ran, each counted by its own name (a combination's members, not the combination)."""
        mode = normalize_mode(kind, mode)
        self.requests.labels(kind, mode, str(status)).inc()
        self.request_duration.labels(kind, mode).observe(duration_s)
        for hist, value in ((self.queue_time, queue_s), (self.ttft, ttft_s), (self.tpot, tpot_s)):
            if value is not None:
                hist.labels(kind, mode).observe(value)
        if prompt_tokens:
            self.prompt_tokens.labels(kind).inc(prompt_tokens)
        if cached_tokens:
            self.cached_prompt_tokens.labels(kind).inc(cached_tokens)
        if completion_tokens:
            self.generated_tokens.labels(kind).inc(completion_tokens)
        self._count_adapters(adapters)

    def request_rejected(self, kind: str, mode: str | None, status: str = "rejected", *,
                         adapters: tuple[str, ...] = ()) -> None:
        """A request was turned away before running (a full queue)."""
        mode = normalize_mode(kind, mode)
        self.requests.labels(kind, mode, str(status)).inc()
        self._count_adapters(adapters)

    def http_response(self, method: str, route: str, code: int) -> None:
        """One HTTP answer (or a client that left before one: 499)."""
        self.http_responses.labels(method, route, str(code)).inc()

    def _count_adapters(self, adapters: tuple[str, ...]) -> None:
        if self.per_adapter_limit == 0:
            return
        for adapter in adapters:
            with self._lock:
                if adapter not in self._adapters_seen:
                    if len(self._adapters_seen) >= self.per_adapter_limit:
                        adapter = OTHER_ADAPTER
                    else:
                        self._adapters_seen.add(adapter)
            self.adapter_requests.labels(adapter).inc()

    def set_queue(self, running: int, waiting: int) -> None:
        """The scheduler's current running batch size and waiting-queue length."""
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def set_kv_cache(self, used_bytes: int, cached_bytes: int, allocated_bytes: int) -> None:
        """Bytes of the KV blocks rows hold, of the idle cached prompt blocks, and of the block pool."""
        self.kv_cache.labels("used").set(used_bytes)
        self.kv_cache.labels("cached").set(cached_bytes)
        self.kv_cache.labels("allocated").set(allocated_bytes)

    # -- engine steps ------------------------------------------------------------------------

    def step(self, batch_kinds: str | Iterable[str | tuple[str, str | None]], seconds: float,
             batch_size: int) -> None:
        """One decode step of `batch_size` rows took `seconds`; `batch_kinds` as in
        `batch_kinds_label` (a ready label, row tokens, or (kind, mode) pairs)."""
        self.decode_step.labels(batch_kinds_label(batch_kinds)).observe(seconds)
        self.batch_size.observe(batch_size)

    def adapter_layer(self, kind: str, mode: str | None, seconds: float) -> None:
        """Time one decode step spent in `kind`'s adapter computation (0.0 for merged LoRA)."""
        self.adapter_layer_time.labels(kind, normalize_mode(kind, mode)).observe(seconds)

    # -- adapters ----------------------------------------------------------------------------

    def adapter_loaded(self, kind: str, seconds: float) -> None:
        """An adapter of `kind` was loaded and placed on the device in `seconds`."""
        self.adapter_load.labels(self._adapter_kind(kind)).observe(seconds)

    def merged(self, seconds: float) -> None:
        """A LoRA adapter was merged into the base weights in `seconds`."""
        self.adapter_merge.observe(seconds)

    def restored(self, seconds: float) -> None:
        """The base weights were restored after a merged phase in `seconds`."""
        self.adapter_restore.observe(seconds)

    def set_registered(self, kind: str, n: int) -> None:
        """`n` adapters of `kind` are registered."""
        self.adapters_registered.labels(self._adapter_kind(kind)).set(n)

    def set_resident(self, kind: str, n: int) -> None:
        """`n` adapters of `kind` are resident on the device."""
        self.adapters_resident.labels(self._adapter_kind(kind)).set(n)

    def evicted(self, n: int = 1) -> None:
        """`n` adapters were evicted from the device."""
        self.evictions.inc(n)

    def set_adapter_memory(self, device: str, nbytes: int) -> None:
        """Resident adapter weights take `nbytes` on `device` (e.g. `cuda:0`, `cpu`)."""
        self.adapter_memory.labels(str(device)).set(nbytes)

    @staticmethod
    def _adapter_kind(kind: str) -> str:
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"metrics: adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        return kind

    # -- gateway (vLLM names) ------------------------------------------------------------------

    def watch_gateway(self, state: Callable[[], "GatewayState"]) -> None:
        """Export the Gateway API Inference Extension's series, from `state()` at each scrape."""
        self.registry.register(_GatewayCollector(state))

    # -- exposition --------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def metric_names(self) -> set[str]:
        """Names as exposed (counters with `_total`, histograms without their suffixes)."""
        names = set()
        for family in self.registry.collect():
            names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        return names


@dataclass(frozen=True)
class GatewayState:
    """What the gateway's endpoint picker reads of one replica, at one moment."""

    running: int
    waiting: int
    kv_usage: float  # 0..1
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_lora: int


class _GatewayCollector:
    def __init__(self, state: Callable[[], GatewayState]) -> None:
        self.state = state

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(self.state()))

    @staticmethod
    def _families(s: GatewayState | None) -> list[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be processed.")
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.")
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent usage.")
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests; the value is the "
                                 "time of this sample.", labels=("running_lora_adapters", "waiting_lora_adapters", "max_lora"))
        if s is not None:
            waiting.add_metric((), s.waiting)
            running.add_metric((), s.running)
            kv.add_metric((), min(1.0, s.kv_usage))
            lora.add_metric((",".join(s.running_adapters), ",".join(s.waiting_adapters), str(s.max_lora)), time.time())
        return [waiting, running, kv, lora]
