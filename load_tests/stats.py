"""Percentiles and the per-request measurements they summarise."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from sending it."""

    ttft_s: float | None = None
    e2e_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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


MAX_ERROR_SAMPLES = 3


def summarize(name: str, concurrency: int, results: Sequence[RequestResult], wall_s: float) -> ScenarioResult:
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
