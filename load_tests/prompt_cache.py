"""What the prompt cache saves a request's time to first token, in-process on the bench model.

    python -m load_tests.prompt_cache [--models load_tests/models] [--prompt 1024] [--rounds 5]

Each round, with a new random prompt: the prompt computed (nothing cached), the same prompt again
(all its full blocks cached but the one holding the last token), and an aLoRA turn (`lora-0` served
with an invocation) extending the base prompt by the invocation and a few tokens, whose blocks
before the invocation are the base model's. One engine (the server's), one request at a time,
time to first token; the medians over rounds, side by side.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch

from load_tests.alora_reuse import INVOCATION, bench_alora
from load_tests.layout import DEFAULT_MODELS_DIR
from server.adapters.adapter import Adapter
from server.engine.engine import Engine, EngineSettings
from server.engine.request import DoneEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.metrics import Metrics


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args()


async def ttft(engine: Engine, prompt: list[int], adapter: Adapter | None) -> float:
    t0 = time.perf_counter()
    first = None
    async for event in engine.generate(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True), adapter,
                                       "unmerged" if adapter else "none"):
        if isinstance(event, TokenEvent) and first is None:
            first = time.perf_counter() - t0
        elif isinstance(event, DoneEvent) and event.error is not None:
            raise event.error
    return first


async def rounds(engine: Engine, alora: Adapter, args: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"computed": [], "repeated": [], "alora after base": []}
    for r in range(args.rounds):
        prompt = torch.randint(100, 4000, (args.prompt,), generator=torch.Generator().manual_seed(r)).tolist()
        times["computed"].append(await ttft(engine, prompt, None))
        times["repeated"].append(await ttft(engine, prompt, None))
        times["alora after base"].append(await ttft(engine, prompt + list(INVOCATION) + [200, 201], alora))
    return times


def main() -> None:
    args = parse_args()
    base, alora = bench_alora(args.models)
    engine = Engine(base, EngineSettings(max_prefill_tokens=4096, prefill_chunk_tokens=4096), Metrics())
    engine.start()
    engine.wait_ready()
    try:
        times = asyncio.run(rounds(engine, alora, args))
    finally:
        engine.stop(30)
    computed = statistics.median(times["computed"])
    print(f"prompt {args.prompt} tokens, time to first token, median of {args.rounds} rounds:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<17} {1000 * median:8.1f} ms  ({computed / median:.1f}x less than computed)")


if __name__ == "__main__":
    main()
