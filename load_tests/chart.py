"""PNG of per-token latency per scenario (one adapter kind each) and, if run, the concurrency ramp."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from load_tests.stats import ScenarioResult

RAMP_PREFIX = "ramp-"


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("--png needs matplotlib: .venv/bin/pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_value(ms: float | None) -> float:
    return 0.0 if ms is None else ms


def write_chart(results: Sequence[ScenarioResult], path: Path) -> None:
    plt = _pyplot()
    kinds = [r for r in results if not r.name.startswith(RAMP_PREFIX)]
    ramp = [r for r in results if r.name.startswith(RAMP_PREFIX)]
    figure, axes = plt.subplots(1, 2 if ramp else 1, figsize=(14 if ramp else 9, 5), squeeze=False)
    latency = axes[0][0]
    positions = range(len(kinds))
    latency.bar([p - 0.2 for p in positions], [_bar_value(r.per_token.p50_ms) for r in kinds], 0.4, label="p50")
    latency.bar([p + 0.2 for p in positions], [_bar_value(r.per_token.p99_ms) for r in kinds], 0.4, label="p99")
    latency.set_xticks(list(positions), [r.name for r in kinds], rotation=30, ha="right")
    latency.set_ylabel("per-token latency (ms)")
    latency.set_title("Per-token latency by scenario")
    latency.legend()
    if ramp:
        throughput = axes[0][1]
        throughput.plot([r.concurrency for r in ramp], [r.tokens_per_s for r in ramp], marker="o")
        throughput.set_xscale("log", base=2)
        throughput.set_xlabel("concurrent requests (base model)")
        throughput.set_ylabel("generated tokens/s")
        throughput.set_title("Concurrency ramp")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
