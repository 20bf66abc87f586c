"""Percentiles and the per-request measurements they summarise."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from load_tests.scrape import ServerMetrics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from sending it."""

    ttft_s: float | None = None
    e2e_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    kind: str | None = None  # as the server's batch_kinds token (see scrape.row_kind), from the final event
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mean_gap_s(self) -> float | None:
        """Mean gap between streamed tokens: the client's time per output token."""
        return sum(self.token_gaps_s) / len(self.token_gaps_s) if self.token_gaps_s else None


@dataclass(frozen=True)
class LatencySummary:
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        def ms(q: float) -> float | None:
            value = percentile(seconds, q)
            return None if value is None else value * 1000.0

        return cls(p50_ms=ms(50), p99_ms=ms(99))


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft: LatencySummary
    per_token: LatencySummary
    e2e: LatencySummary
    error_samples: list[str]
    mean_gap_ms: dict[str, float]  # per kind: mean over requests of their mean token gap
    server: ServerMetrics | None = None  # GET /metrics over the timed rounds


MAX_ERROR_SAMPLES = 3


def mean_gaps_ms(results: Sequence[RequestResult]) -> dict[str, float]:
    """Per kind, the mean of each request's mean token gap (as the server averages its TPOT)."""
    gaps: dict[str, list[float]] = {}
    for r in results:
        if r.kind is not None and (gap := r.mean_gap_s) is not None:
            gaps.setdefault(r.kind, []).append(gap)
    return {kind: sum(g) / len(g) * 1000.0 for kind, g in sorted(gaps.items())}


def summarize(
    name: str, concurrency: int, results: Sequence[RequestResult], wall_s: float, server: ServerMetrics | None = None
) -> ScenarioResult:
    done = [r for r in results if r.ok]
    errors = sorted({r.error for r in results if r.error is not None})
    tokens = sum(r.completion_tokens for r in done)
    return ScenarioResult(
        name=name,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(done),
        wall_s=wall_s,
        tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(done) / wall_s if wall_s > 0 else 0.0,
        ttft=LatencySummary.of([r.ttft_s for r in done if r.ttft_s is not None]),
        per_token=LatencySummary.of([gap for r in done for gap in r.token_gaps_s]),
        e2e=LatencySummary.of([r.e2e_s for r in done if r.e2e_s is not None]),
        error_samples=errors[:MAX_ERROR_SAMPLES],
        mean_gap_ms=mean_gaps_ms(done),
        server=server,
    )


@dataclass(frozen=True)
class BaselineResult:
    """One in-process reference measurement (PEFT / plain transformers)."""

    name: str
    method: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
