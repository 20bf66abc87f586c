"""The server's own view of a scenario: two GET /metrics scrapes, their difference, histogram means.

Kinds are keyed as the server's `batch_kinds` tokens (`base`, `lora_merged`, `lora_unmerged`,
`prompt`, `bottleneck`), so a kind's decode steps are those whose label holds its token.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

TPOT = "hotswap_time_per_output_token_seconds"  # one observation per request, labels kind, mode
ADAPTER_LAYER = "hotswap_adapter_layer_seconds"  # one per measured decode step and kind in it
DECODE_STEP = "hotswap_decode_step_seconds"  # one per decode step, label batch_kinds

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def row_kind(kind: str, mode: str | None) -> str:
    """A request's token in the server's `batch_kinds`: `lora_merged`, `lora_unmerged`, or its kind."""
    return f"{kind}_{mode}" if kind == "lora" else kind


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before: Samples, after: Samples) -> Samples:
    """What accrued between two scrapes; a series absent before counts from 0."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


@dataclass(frozen=True)
class Mean:
    mean_ms: float
    count: int

    @property
    def total_ms(self) -> float:
        return self.mean_ms * self.count


def pooled(means: Sequence[Mean]) -> Mean | None:
    count = sum(m.count for m in means)
    return Mean(sum(m.total_ms for m in means) / count, count) if count else None


def histogram_means(samples: Samples, histogram: str, key: Callable[[Mapping[str, str]], str]) -> dict[str, Mean]:
    """`histogram`'s sum / count per `key(labels)`, for the keys with observations."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    for (name, labels), value in samples.items():
        if name == f"{histogram}_sum":
            sums[key(dict(labels))] += value
        elif name == f"{histogram}_count":
            counts[key(dict(labels))] += value
    return {k: Mean(sums[k] / n * 1000.0, round(n)) for k, n in sorted(counts.items()) if n > 0}


def _by_row_kind(labels: Mapping[str, str]) -> str:
    return row_kind(labels["kind"], labels["mode"])


def _by_batch_kinds(labels: Mapping[str, str]) -> str:
    return labels["batch_kinds"]


@dataclass(frozen=True)
class ServerMetrics:
    tpot: dict[str, Mean]  # per row kind: mean time per output token
    adapter_layer: dict[str, Mean]  # per row kind: mean adapter-layer time per measured decode step
    decode_step: dict[str, Mean]  # per batch_kinds label: mean decode step

    @classmethod
    def between(cls, before: str, after: str) -> ServerMetrics:
        """From the text of a scrape before and one after."""
        accrued = delta(parse(before), parse(after))
        return cls(
            tpot=histogram_means(accrued, TPOT, _by_row_kind),
            adapter_layer=histogram_means(accrued, ADAPTER_LAYER, _by_row_kind),
            decode_step=histogram_means(accrued, DECODE_STEP, _by_batch_kinds),
        )

    def steps_with(self, kind: str) -> Mean | None:
        """The mean decode step over the batches that held a `kind` row."""
        return pooled([m for label, m in self.decode_step.items() if kind in label.split("+")])
