"""Does a long prompt stall the streams already decoding? Chunked prefill against one-shot, side by side.

    python -m load_tests.stall [--prompt-tokens 1500] [--streams 8] [--rounds 3] [--chunks 0 4096]

One server per `--prefill-chunk-tokens` value (0: the device default; 4096: the whole prompt in
one piece), both up at once, rounds interleaved. Each round: `--streams` streamed requests start
decoding; once each has its first tokens, a request with a `--prompt-tokens` prompt arrives. Per
stream, its largest token gap over its median gap; the report gives the worst stream's ratio and
the long request's time to first token (issue 14's goal: largest gap under 4x the median).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from load_tests.ab import in_turn
from load_tests.bench import server_options
from load_tests.client import GenerateRequest, HotswapClient
from load_tests.layout import DEFAULT_MODELS_DIR, BenchLayout
from load_tests.prompts import make_prompt
from load_tests.runner import wait_ready
from load_tests.server_process import SpawnedServer

DECODE_TOKENS = 96
HEAD_START_S = 1.0  # the streams decode this long before the long prompt arrives


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 4096], help="--prefill-chunk-tokens values")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-resident-adapters", type=int, default=8)
    return parser.parse_args(argv)


async def one_round(client: HotswapClient, streams: int, prompt_tokens: int, seed: int) -> tuple[float, float]:
    """(worst stream's largest gap / its median gap, the long request's TTFT in s)."""
    decoding = [asyncio.create_task(client.generate(GenerateRequest(None, make_prompt(i, seed), DECODE_TOKENS)))
                for i in range(streams)]
    await asyncio.sleep(HEAD_START_S)
    long = await client.generate(GenerateRequest(None, make_prompt(streams, seed, prompt_tokens), 4))
    results = await asyncio.gather(*decoding)
    if not long.ok or not all(r.ok for r in results):
        raise RuntimeError(f"errors: {[r.error for r in [long, *results] if not r.ok]}")
    worst = max(max(r.token_gaps_s) / statistics.median(r.token_gaps_s) for r in results)
    return worst, long.ttft_s or 0.0


async def interleave(urls: dict[int, str], args: argparse.Namespace) -> dict[int, list[tuple[float, float]]]:
    clients = {chunk: HotswapClient(url) for chunk, url in urls.items()}
    out: dict[int, list[tuple[float, float]]] = {chunk: [] for chunk in urls}
    try:
        for client in clients.values():
            await wait_ready(client, 600, lambda: None)
            await one_round(client, 2, args.prompt_tokens, seed=99)  # warm-up: the cache grows to the long row
        for r in range(args.rounds):
            for chunk in in_turn(urls, r):
                worst, ttft = await one_round(clients[chunk], args.streams, args.prompt_tokens, seed=r)
                out[chunk].append((worst, ttft))
                print(f"round {r + 1} chunk {chunk or 'auto'}: max gap {worst:.1f}x median, long TTFT {ttft:.2f}s",
                      file=sys.stderr, flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    BenchLayout(args.models).require_built()
    base = server_options(args)
    with ExitStack() as stack:
        servers = {chunk: stack.enter_context(SpawnedServer(replace(base, extra=("--prefill-chunk-tokens", str(chunk)))))
                   for chunk in args.chunks}
        runs = asyncio.run(interleave({c: s.url for c, s in servers.items()}, args))
    print("| --prefill-chunk-tokens | largest gap / median, worst stream (median of rounds) | long prompt TTFT (s) |")
    print("| --- | --- | --- |")
    for chunk, rounds in runs.items():
        gaps, ttfts = zip(*rounds)
        print(f"| {chunk or 'auto (32 on CPU)'} | {statistics.median(gaps):.1f}x ({min(gaps):.1f}-{max(gaps):.1f}) "
              f"| {statistics.median(ttfts):.2f} |")


if __name__ == "__main__":
    main()
