"""Engine-level check on a GPU: every adapter kind reproduces the fixtures' references in fp32 on CUDA,
alone and in one mixed batch with merged LoRA phases, and bf16 runs; prints decode-step timings.

    python -m load_tests.cuda_check            # needs torch with CUDA, transformers, safetensors, prometheus-client
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from load_tests.gpu import load
from server.adapters.adapter import Adapter
from server.engine.engine import Engine, EngineSettings
from server.engine.sampling import SamplingParams
from server.metrics import Metrics
from server.model import load_base_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def _cases(base_name: str) -> tuple[list[list[int]], list[tuple[str, Path, list[list[int]]]], list[list[int]]]:
    peft = json.loads((FIXTURES / "peft" / base_name / "references.json").read_text())
    hub = json.loads((FIXTURES / "adapterhub" / base_name / "references.json").read_text())
    cases = [(n, FIXTURES / "peft" / base_name / n, a["outputs"]) for n, a in peft["adapters"].items()]
    cases += [(n, FIXTURES / "adapterhub" / base_name / n, a["outputs"]) for n, a in hub["adapters"].items()]
    return peft["prompts"], cases, peft["base_outputs"]


async def _generate(engine: Engine, prompt: list[int], adapter: Adapter | None, mode: str) -> list[int]:
    out = []
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    async for event in engine.generate(prompt, params, adapter, mode):
        if hasattr(event, "token_id"):
            out.append(event.token_id)
    return out


def check(base_name: str, dtype: str) -> bool:
    base = load_base_model(FIXTURES / base_name, DEVICE, dtype)
    prompts, cases, base_outputs = _cases(base_name)
    held = {name: load(base, name, folder) for name, folder, _ in cases}
    metrics = Metrics()
    engine = Engine(base, EngineSettings(max_batch_size=64), metrics)
    engine.start()
    engine.wait_ready()
    jobs = [(None, "none", p, o) for p, o in zip(prompts, base_outputs)]
    for name, _, outputs in cases:
        modes = ["unmerged", "merged"] if held[name].kind == "lora" else ["none"]
        jobs += [(held[name], m, p, o) for m in modes for p, o in zip(prompts, outputs)]

    async def run_all():
        alone = [await _generate(engine, p, a, m) for a, m, p, _ in jobs]
        t0 = time.perf_counter()
        mixed = await asyncio.gather(*(_generate(engine, p, a, m) for a, m, p, _ in jobs))
        return alone, mixed, time.perf_counter() - t0

    alone, mixed, seconds = asyncio.run(run_all())
    engine.stop(10)
    expected = [o for *_, o in jobs]
    ok_ref = sum(a == e for a, e in zip(alone, expected))
    ok_mix = sum(m == a for m, a in zip(mixed, alone))
    print(f"{base_name} {dtype}: alone == reference {ok_ref}/{len(jobs)}; mixed == alone {ok_mix}/{len(jobs)}; "
          f"mixed batch of {len(jobs)} x 12 tokens in {seconds:.2f}s")
    steps = [line for line in metrics.render()[0].decode().splitlines()
             if line.startswith(("hotswap_decode_step_seconds_sum", "hotswap_adapter_layer_seconds_sum"))
             and not line.endswith(" 0.0")]
    print("\n".join("  " + s for s in steps))
    return ok_mix == len(jobs) and (dtype != "float32" or ok_ref == len(jobs))


def main() -> int:
    print(torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch", torch.__version__)
    results = [check(b, d) for b in ("tiny-llama", "tiny-gpt2") for d in (("float32", "bfloat16") if DEVICE == "cuda" else ("float32",))]
    print("CUDA CHECK", "PASSED" if all(results) else "FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
