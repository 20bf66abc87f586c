"""Two checkouts of the server side by side on the bench model, interleaved: is the change slower?

    python -m load_tests.ab --before DIR --after DIR [--scenarios base lora-mixed] [--rounds 4]
                            [--tokens 64] [--json out.json]

DIR is a checkout of this repository (e.g. `git worktree add /tmp/before HEAD~1`); each side's
`python -m server` runs from its own folder, both servers stay up, and each round runs every
scenario on both sides back to back, alternating which side goes first. These machines drift by
2x within minutes, so each after/before ratio compares runs seconds apart; the report gives the
median of the per-round ratios beside each side's median tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from load_tests.bench import server_options
from load_tests.client import HotswapClient
from load_tests.layout import DEFAULT_MODELS_DIR, BenchLayout
from load_tests.runner import register_missing, run_scenario, wait_ready
from load_tests.scenarios import ALL_SCENARIOS, Scenario, ScenarioSettings, build_scenarios
from load_tests.server_process import SpawnedServer

SIDES = ("before", "after")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the reference side")
    parser.add_argument("--after", type=Path, required=True, help="checkout of the changed side")
    parser.add_argument("--scenarios", nargs="+", default=["base", "lora-mixed"], choices=ALL_SCENARIOS)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-resident-adapters", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def in_turn(sides: Sequence, round_index: int) -> list:
    """The order of the sides in a round: alternating which goes first, so drift cancels."""
    return list(sides) if round_index % 2 == 0 else list(sides)[::-1]


async def interleave(urls: dict[str, str], scenarios: list[Scenario], rounds: int, timeout_s: float,
                     layout: BenchLayout) -> dict[str, dict[str, list[float]]]:
    """tokens/s per scenario per side, one value per round."""
    clients = {side: HotswapClient(url, timeout_s=timeout_s) for side, url in urls.items()}
    out: dict[str, dict[str, list[float]]] = {s.name: {side: [] for side in SIDES} for s in scenarios}
    try:
        for client in clients.values():
            await wait_ready(client, 600, lambda: None)
            for scenario in scenarios:
                await register_missing(client, layout, sorted(scenario.adapters()))
        for r in range(rounds):
            for scenario in scenarios:
                for side in in_turn(SIDES, r):
                    result = await run_scenario(clients[side], scenario, 1)
                    if result.errors:
                        raise RuntimeError(f"{side} {scenario.name}: {result.error_samples}")
                    out[scenario.name][side].append(result.tokens_per_s)
                    print(f"round {r + 1} {scenario.name:<12} {side:<6} {result.tokens_per_s:8.1f} tok/s",
                          file=sys.stderr, flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return out


def report(runs: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| scenario | before tok/s (median) | after tok/s (median) | after/before, median of rounds | rounds |",
             "| --- | --- | --- | --- | --- |"]
    for name, sides in runs.items():
        ratios = [a / b for a, b in zip(sides["after"], sides["before"])]
        lines.append(f"| {name} | {statistics.median(sides['before']):.1f} | {statistics.median(sides['after']):.1f} "
                     f"| {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) | {len(ratios)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    BenchLayout(args.models).require_built()
    scenarios = build_scenarios(args.scenarios, ScenarioSettings(max_new_tokens=args.tokens))
    base = server_options(args)
    with ExitStack() as stack:
        servers = {side: stack.enter_context(SpawnedServer(replace(base, repo=getattr(args, side).resolve())))
                   for side in SIDES}
        runs = asyncio.run(interleave({s: srv.url for s, srv in servers.items()}, scenarios, args.rounds,
                                      args.request_timeout, BenchLayout(args.models)))
    print(report(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
