"""Results as aligned text tables, ratios against the base model and PEFT, and JSON."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from load_tests.crosscheck import KindCheck, Versus, kind_checks, merged_vs_base
from load_tests.stats import BaselineResult, ScenarioResult, ratio

BASE_SCENARIO = "base"
# Which in-process baseline each hotswap scenario is compared with.
PEFT_COUNTERPART = {
    "base": "base-static-8",
    "lora-mixed": "lora-mixed-8",
    "lora-32x8": "lora-sequential-32x8",
    "prompt": "prompt-8",
}


@dataclass(frozen=True)
class Goal:
    label: str
    scenario: str
    target: float
    versus_peft: bool = False  # False: divided by hotswap's `base`; True: by the PEFT counterpart


GOALS = (
    Goal("mixed LoRA / base", "lora-mixed", 0.90),
    Goal("two LoRAs combined per request / base", "lora-pairs", 0.85),
    Goal("merged LoRA / base", "lora-merged", 0.97),
    Goal("prompt / base", "prompt", 0.95),
    Goal("bottleneck / base", "bottleneck", 0.85),
    Goal("mixed LoRA / PEFT mixed batch", "lora-mixed", 1.5, versus_peft=True),
    Goal("32 over 8 LoRAs / PEFT one at a time", "lora-32x8", 5.0, versus_peft=True),
)


@dataclass(frozen=True)
class GoalOutcome:
    label: str
    ratio: float | None
    target: float

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= self.target


def throughputs(results: Sequence[ScenarioResult]) -> dict[str, float]:
    return {r.name: r.tokens_per_s for r in results}


def baseline_throughputs(baseline: Sequence[BaselineResult]) -> dict[str, float]:
    return {b.name: b.tokens_per_s for b in baseline}


def peft_throughput(scenario: str, baseline: dict[str, float]) -> float | None:
    counterpart = PEFT_COUNTERPART.get(scenario)
    return None if counterpart is None else baseline.get(counterpart)


def evaluate_goals(results: Sequence[ScenarioResult], baseline: Sequence[BaselineResult]) -> list[GoalOutcome]:
    hotswap, peft = throughputs(results), baseline_throughputs(baseline)
    outcomes = []
    for goal in GOALS:
        denominator = peft_throughput(goal.scenario, peft) if goal.versus_peft else hotswap.get(BASE_SCENARIO)
        outcomes.append(GoalOutcome(goal.label, ratio(hotswap.get(goal.scenario), denominator), goal.target))
    return outcomes


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """`align`: one letter per column, "l" or "r" (default: the first left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def cell(text: str, width: int, side: str) -> str:
        return text.ljust(width) if side == "l" else text.rjust(width)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell(*spec) for spec in zip(cells, widths, align, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


SCENARIO_HEADERS = (
    "scenario", "conc", "reqs", "err", "tok/s", "req/s", "ttft p50", "ttft p99",
    "tok p50", "tok p99", "e2e p50", "e2e p99", "vs base", "PEFT tok/s", "vs PEFT",
)


def format_scenarios(results: Sequence[ScenarioResult], baseline: Sequence[BaselineResult]) -> str:
    base = throughputs(results).get(BASE_SCENARIO)
    peft = baseline_throughputs(baseline)
    rows = []
    for r in results:
        reference = peft_throughput(r.name, peft)
        rows.append([
            r.name, str(r.concurrency), str(r.requests), str(r.errors),
            _num(r.tokens_per_s), _num(r.requests_per_s, 2),
            _num(r.ttft.p50_ms), _num(r.ttft.p99_ms), _num(r.per_token.p50_ms), _num(r.per_token.p99_ms),
            _num(r.e2e.p50_ms, 0), _num(r.e2e.p99_ms, 0),
            _times(ratio(r.tokens_per_s, base)), _num(reference), _times(ratio(r.tokens_per_s, reference)),
        ])
    return format_table(SCENARIO_HEADERS, rows) + "\n(latencies in ms; tok = gap between streamed tokens)"


CHECK_HEADERS = (
    "scenario", "kind", "reqs", "server TPOT", "client gap", "server/client", "adapter/step", "step", "adapter share",
)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_checks(checks: Sequence[KindCheck], versus: Sequence[Versus]) -> str:
    """The server's metrics next to the client's measurements, and merged LoRA against base."""
    rows = [
        [c.scenario, c.kind, str(c.server_requests), _num(c.server_tpot_ms, 2), _num(c.client_gap_ms, 2),
         _times(c.tpot_ratio), _num(c.adapter_ms, 3), _num(c.step_ms, 2), _share(c.adapter_share)]
        for c in checks
    ]
    lines = [
        "server metrics vs client",
        format_table(CHECK_HEADERS, rows, align="llrrrrrrr"),
        ("(ms; server TPOT, adapter/step and step: GET /metrics deltas over the timed rounds;"
         " client gap: each request's mean token gap, averaged)"),
    ]
    if versus:
        compared = "; ".join(
            f"{v.measure} {_num(v.merged_ms, 2)} vs {_num(v.base_ms, 2)} ms ({_times(v.merged_to_base)})"
            for v in versus
        )
        lines.append(f"lora merged vs base: {compared}")
    return "\n".join(lines)


def format_baseline(baseline: Sequence[BaselineResult]) -> str:
    rows = [[b.name, _num(b.tokens_per_s), str(b.tokens), _num(b.seconds, 2), b.method] for b in baseline]
    return format_table(("PEFT baseline", "tok/s", "tokens", "seconds", "method"), rows, align="lrrrl")


def format_goals(outcomes: Sequence[GoalOutcome]) -> str:
    verdicts = {True: "met", False: "MISSED", None: "n/a"}
    rows = [[o.label, _times(o.ratio), f">= {o.target:.2f}x", verdicts[o.met]] for o in outcomes]
    return format_table(("goal", "hotswap", "target", "verdict"), rows)


def report_json(
    settings: dict[str, object], results: Sequence[ScenarioResult], baseline: Sequence[BaselineResult]
) -> dict[str, object]:
    base = throughputs(results).get(BASE_SCENARIO)
    return {
        "settings": settings,
        "scenarios": [{**asdict(r), "ratio_to_base": ratio(r.tokens_per_s, base)} for r in results],
        "server_vs_client": checks_json(kind_checks(results)),
        "baseline": baseline_json(baseline),
        "goals": [{**asdict(o), "met": o.met} for o in evaluate_goals(results, baseline)],
    }


def checks_json(checks: Sequence[KindCheck]) -> dict[str, object]:
    return {
        "kinds": [{**asdict(c), "tpot_ratio": c.tpot_ratio, "adapter_share": c.adapter_share} for c in checks],
        "merged_vs_base": [{**asdict(v), "merged_to_base": v.merged_to_base} for v in merged_vs_base(checks)],
    }


def baseline_json(baseline: Sequence[BaselineResult]) -> list[dict[str, object]]:
    return [{**asdict(b), "tokens_per_s": b.tokens_per_s} for b in baseline]


def baseline_from_json(rows: Sequence[dict[str, object]]) -> list[BaselineResult]:
    return [
        BaselineResult(str(r["name"]), str(r["method"]), int(str(r["tokens"])), float(str(r["seconds"])))
        for r in rows
    ]
