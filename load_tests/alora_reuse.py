"""What reusing the base model's prefix saves an activated LoRA (aLoRA) request, in-process.

    python -m load_tests.alora_reuse [--models load_tests/models] [--prompt 1024] [--tail 32]

An aLoRA row is the base model's up to its invocation (server/adapters/alora.py), so the KV of a
prompt's part before the invocation, once computed for the base (or for another aLoRA on the same
base, e.g. the turn before in a conversation), serves it as it is: only the invocation and what
follows need prefilling. On the bench model, `lora-0` served as an aLoRA: the prefill of the whole
prompt against the prefill of its last `--tail` tokens over the cached base prefix, median of
`--repeats`. It checks first that the aLoRA row's prefix KV is the base row's bit for bit (same prompt, one
prefill each) and that both ways pick the same next token.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from load_tests.layout import DEFAULT_MODELS_DIR, BenchLayout, lora_name
from server.adapters.adapter import Adapter
from server.adapters.kinds import load_weights
from server.adapters.lora import ensure_wrapped
from server.engine.cache import BlockTable, KVCache
from server.engine.engine import EngineSettings
from server.engine.prefill import Prefiller
from server.engine.request import Request
from server.engine.sampling import SamplingParams
from server.model import BaseModel, load_base_model

INVOCATION = (11, 12, 13)  # ids the bench prompts (make_prompt) never hold


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    p.add_argument("--tail", type=int, default=32, help="tokens from the invocation on (the invocation included)")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_alora(models: Path) -> tuple[BaseModel, Adapter]:
    """The bench model and its `lora-0` served as an aLoRA invoked by INVOCATION."""
    layout = BenchLayout(models)
    layout.require_built()
    base = load_base_model(layout.model_dir)
    _, weights = load_weights(layout.adapter_dir(lora_name(0)), base)
    weights = replace(weights, spec=replace(weights.spec, alora_invocation_tokens=INVOCATION))
    ensure_wrapped(base.hf, weights.modules, base.lora_ctx)
    return base, Adapter("lora-0-alora", "lora", weights.to(base.device, base.dtype), "unmerged", "bench")


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    base, adapter = bench_alora(args.models)
    prefix = args.prompt - args.tail
    ids = torch.randint(100, 4000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    ids[prefix : prefix + len(INVOCATION)] = INVOCATION
    loop = asyncio.new_event_loop()
    alora = Request(ids, SamplingParams(max_new_tokens=1), adapter, "unmerged", loop, None)
    plain = Request(ids, SamplingParams(max_new_tokens=1), None, "none", loop, None)
    g = base.geometry
    cache = KVCache(g.n_layers, g.n_kv_heads, g.head_dim, g.max_len, base.dtype, base.device)
    prefiller = Prefiller(base, cache, EngineSettings(max_prefill_tokens=args.prompt))
    tail = base.decoder.embed(torch.tensor(ids[prefix:], device=base.device))  # [tail, H]

    _, whole_logits, _ = prefiller.prefill([alora])
    prefiller.prefill([plain])  # the base model's KV, as a prefix cache would hold it
    keys = [cache.read_prefix(r.kv, prefix)[0] for r in (alora, plain)]
    assert all(torch.equal(a, b) for a, b in zip(*keys)), "the aLoRA row's prefix KV is not the base row's"
    reusing = Request(ids, SamplingParams(max_new_tokens=1), adapter, "unmerged", loop, None)
    reusing.kv = BlockTable(list(plain.kv.blocks))  # the base row's blocks: its prefix as it is
    reused_logits = prefiller.prefill_chunk(reusing, prefix, tail)
    assert int(whole_logits.argmax()) == int(reused_logits.argmax())

    whole = _median_s(lambda: prefiller.prefill([alora]), args.repeats)
    reused = _median_s(lambda: prefiller.prefill_chunk(reusing, prefix, tail), args.repeats)
    print(f"{args.prompt}-token prompt, invocation at {prefix} ({base.device}, {base.dtype}): whole prefill "
          f"{whole * 1000:.0f} ms, last {args.tail} tokens over the reused base prefix {reused * 1000:.0f} ms "
          f"({whole / reused:.1f}x less time to first token); prefix KV equal bit for bit")


if __name__ == "__main__":
    main()
