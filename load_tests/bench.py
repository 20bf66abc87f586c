"""Load generator for the hotswap server: throughput and latency per adapter kind.

    python -m load_tests.bench --spawn [--scenarios base lora-mixed ...] [--quick]
                               [--json out.json] [--png chart.png] [--baseline peft|FILE.json]
    python -m load_tests.bench --url http://127.0.0.1:8000 ...

Each scenario sends its requests all at once (32-token seeded random prompts, greedy, streamed
over SSE), after a short warm-up copy of the same batch. `--spawn` starts `python -m server` on
the bench model built by `python -m load_tests.build_bench_model`; with `--url` any adapter the
server lacks is uploaded from the bench folder. `churn` needs `build_bench_model --churn`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from load_tests.client import HotswapClient
from load_tests.crosscheck import kind_checks, merged_vs_base
from load_tests.layout import DEFAULT_MODELS_DIR, BenchLayout
from load_tests.prompts import PROMPT_TOKENS
from load_tests.report import (
    baseline_from_json,
    evaluate_goals,
    format_baseline,
    format_checks,
    format_goals,
    format_scenarios,
    report_json,
)
from load_tests.runner import register_missing, run_scenario, wait_ready
from load_tests.scenarios import (
    ALL_SCENARIOS,
    DEFAULT_SCENARIOS,
    QUICK_RAMP_LEVELS,
    Scenario,
    ScenarioSettings,
    build_scenarios,
)
from load_tests.server_process import ServerOptions, SpawnedServer
from load_tests.stats import BaselineResult, ScenarioResult

BENCH_FAILURES = (RuntimeError, TimeoutError, OSError)  # server died or never ready, upload refused, files missing
QUICK_TOKENS = 16
FULL_TOKENS = 64


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--spawn", action="store_true", help="start the server on the bench model")
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), choices=ALL_SCENARIOS,
                        metavar="NAME", help=f"any of: {' '.join(ALL_SCENARIOS)} (default: all but churn)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS} new tokens, ramp up to 8")
    parser.add_argument("--rounds", type=int, default=1, help="times each scenario's batch is sent (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR, help="bench model and adapters")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--png", type=Path, help="write a latency chart here (needs matplotlib)")
    parser.add_argument("--baseline", metavar="peft|FILE",
                        help="'peft': measure PEFT in-process after the run; FILE: JSON written by peft_baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the spawned server and the baseline")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-resident-adapters", type=int, default=8)
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for GET /ready")
    parser.add_argument("--request-timeout", type=float, default=900.0)
    return parser.parse_args(argv)


def _log(line: str, end: str = "\n") -> None:
    print(line, end=end, file=sys.stderr, flush=True)


def _progress(result: ScenarioResult) -> str:
    errors = f", {result.errors} ERRORS" if result.errors else ""
    return f"{result.tokens_per_s:8.1f} tok/s  {result.wall_s:6.1f}s{errors}"


async def run_scenarios(
    args: argparse.Namespace, scenarios: Sequence[Scenario], url: str, exit_code: Callable[[], int | None]
) -> list[ScenarioResult]:
    client = HotswapClient(url, timeout_s=args.request_timeout)
    layout = BenchLayout(args.models)
    results = []
    try:
        await wait_ready(client, args.ready_timeout, exit_code)
        for index, scenario in enumerate(scenarios, start=1):
            uploaded = await register_missing(client, layout, sorted(scenario.adapters()))
            note = f" (uploaded {len(uploaded)})" if uploaded else ""
            head = f"[{index:2}/{len(scenarios)}] {scenario.name:<14} {scenario.concurrency:3} concurrent{note} ..."
            _log(head, end=" ")
            results.append(await run_scenario(client, scenario, args.rounds))
            _log(_progress(results[-1]))
    finally:
        await client.aclose()
    return results


def server_options(args: argparse.Namespace) -> ServerOptions:
    layout = BenchLayout(args.models)
    return ServerOptions(
        model_dir=layout.model_dir,
        adapters={name: layout.adapter_dir(name) for name in layout.served_adapters()},
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        max_resident_adapters=args.max_resident_adapters,
    )


def run_spawned(args: argparse.Namespace, scenarios: Sequence[Scenario]) -> list[ScenarioResult]:
    BenchLayout(args.models).require_built()
    with SpawnedServer(server_options(args)) as server:
        _log(f"spawned server at {server.url}; waiting for /ready")
        try:
            return asyncio.run(run_scenarios(args, scenarios, server.url, server.exit_code))
        except BENCH_FAILURES:
            _log("--- server log (tail) ---\n" + server.log_tail())
            raise


def load_baseline(args: argparse.Namespace, max_new_tokens: int) -> list[BaselineResult]:
    if args.baseline is None:
        return []
    if args.baseline != "peft":
        return baseline_from_json(json.loads(Path(args.baseline).read_text()))
    _log("PEFT baseline (in-process) ...")
    from load_tests.peft_baseline import BaselineSettings, run_baseline  # torch and peft load only when asked

    settings = BaselineSettings(max_new_tokens=max_new_tokens, seed=args.seed, threads=args.threads)
    return run_baseline(BenchLayout(args.models), settings, _log)


def run_settings(args: argparse.Namespace, settings: ScenarioSettings) -> dict[str, object]:
    return {
        "target": "spawn" if args.spawn else args.url,
        "scenarios": args.scenarios,
        "prompt_tokens": PROMPT_TOKENS,
        "max_new_tokens": settings.max_new_tokens,
        "rounds": args.rounds,
        "seed": args.seed,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "max_resident_adapters": args.max_resident_adapters,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quick = ScenarioSettings(max_new_tokens=QUICK_TOKENS, seed=args.seed, ramp_levels=QUICK_RAMP_LEVELS)
    settings = quick if args.quick else ScenarioSettings(max_new_tokens=FULL_TOKENS, seed=args.seed)
    scenarios = build_scenarios(args.scenarios, settings)
    try:
        if args.spawn:
            results = run_spawned(args, scenarios)
        else:
            results = asyncio.run(run_scenarios(args, scenarios, args.url, lambda: None))
    except BENCH_FAILURES as exc:
        raise SystemExit(f"bench stopped: {type(exc).__name__}: {exc}") from exc
    baseline = load_baseline(args, settings.max_new_tokens)
    print(format_scenarios(results, baseline))
    checks = kind_checks(results)
    print("\n" + format_checks(checks, merged_vs_base(checks)))
    if baseline:
        print("\n" + format_baseline(baseline))
    print("\n" + format_goals(evaluate_goals(results, baseline)))
    for result in results:
        for sample in result.error_samples:
            print(f"{result.name}: {sample}")
    if args.json:
        args.json.write_text(json.dumps(report_json(run_settings(args, settings), results, baseline), indent=2) + "\n")
    if args.png:
        from load_tests.chart import write_chart  # matplotlib loads only when asked

        write_chart(results, args.png)


if __name__ == "__main__":
    main()
