"""The engine on a GPU, in-process, against the memory floor and HF `generate` (issue 14).

    python -m load_tests.gpu [--concurrency 32 1 128] [--tokens 64] [--json out.json]
    python -m load_tests.gpu --tiny ...      # a tiny Llama on the CPU (what the test suite runs)

Builds a random-init bf16 Llama-3-8B-shaped model in memory (no download), writes random adapters
in their libraries' formats to a scratch folder (32 PEFT LoRAs r=16 on all linear layers, a PEFT
soft prompt of 20 tokens, a `seq_bn` bottleneck with reduction 16), loads them through the
server's own readers and runs the engine with no HTTP. At each concurrency, interleaving the base
between variants: base, 32 distinct LoRAs unmerged, soft prompt, bottleneck, one LoRA merged; on
CUDA then `base-eager` and `lora-32-unmerged-eager`, with the engine's decode graphs off
(engine/graphs.py).

Per scenario: generated tokens/s and the decode step time (median over requests of their time
per output token). The memory floor of a decode step is the weight bytes over the bandwidth of
a device-to-device copy measured in the same run. HF `generate` on the same model (SDPA, a static
batch of the same prompts) is the peer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from server.adapters.adapter import Adapter
from server.adapters.kinds import load_weights
from server.engine.engine import Engine, EngineSettings
from server.engine.request import DoneEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.decoder import ATTENTION
from server.metrics import Metrics
from server.model import DEFAULT_MODEL_DIR, BaseModel, base_from_hf

PROMPT_TOKENS = 32
N_LORAS = 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512)


@dataclass(frozen=True)
class Run:
    scenario: str
    concurrency: int
    tokens_per_s: float
    step_ms: float  # median time per output token over the requests


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama (CPU: fp32; what the test runs)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 1, 128],
                        help="run in this order (the goals are at 32: first, should a time limit cut the run)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- model and adapter files


def build_base(tiny: bool, device: torch.device) -> BaseModel:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)  # ids only are sent
    return base_from_hf("llama3-8b-shaped" if not tiny else "tiny-llama", hf, tokenizer)


def _random(shape: tuple[int, ...], g: torch.Generator, std: float) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16).float()


def write_lora(folder: Path, base: BaseModel, seed: int, r: int = 16) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": "all-linear"}))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(base.geometry.n_layers):
        for name in LINEARS:
            layer = base.hf.get_submodule(f"model.layers.{i}.{name}")
            out, inp = layer.weight.shape
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = _random((r, inp), g, inp**-0.5)
            tensors[f"{key}.lora_B.weight"] = _random((out, r), g, 0.02 / r)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def write_prompt(folder: Path, base: BaseModel, n_virtual: int = 20) -> Path:
    folder.mkdir(parents=True)
    g, hidden = torch.Generator().manual_seed(1), base.geometry.hidden
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n_virtual,
         "token_dim": hidden, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}))
    save_file({"prompt_embeddings": _random((n_virtual, hidden), g, 0.02)}, folder / "adapter_model.safetensors")
    return folder


def write_bottleneck(folder: Path, base: BaseModel, reduction: int = 16) -> Path:
    folder.mkdir(parents=True)
    g, hidden = torch.Generator().manual_seed(2), base.geometry.hidden
    b = hidden // reduction
    (folder / "hotswap_bottleneck.json").write_text(json.dumps({"version": 1, "hidden_size": hidden, "config": "seq_bn"}))
    tensors = {}
    for i in range(base.geometry.n_layers):
        p = f"layers.{i}.output"
        tensors |= {f"{p}.down.weight": _random((b, hidden), g, hidden**-0.5), f"{p}.down.bias": torch.zeros(b),
                    f"{p}.up.weight": _random((hidden, b), g, 0.02 / b**0.5), f"{p}.up.bias": torch.zeros(hidden)}
    save_file(tensors, folder / "adapter.safetensors")
    return folder


def load(base: BaseModel, name: str, folder: Path) -> Adapter:
    kind, weights = load_weights(folder, base)
    mode = "unmerged" if kind == "lora" else "none"
    return Adapter(name, kind, weights.to(base.device, base.dtype), mode, "load_tests.gpu")


# ---------------------------------------------------------------- measurements


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(2, vocab, (n, PROMPT_TOKENS), generator=g).tolist()


def hf_generate(base: BaseModel, n: int, tokens: int) -> Run:
    """HF `generate`, static batch, SDPA (our attention switched off for it)."""
    hf = base.hf
    ids = torch.tensor(prompts(n, base.geometry.vocab), device=base.device)
    hf.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            _sync(base.device)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            _sync(base.device)
            wall = time.perf_counter() - t0
    finally:
        hf.set_attn_implementation(ATTENTION)
    return Run("hf-generate", n, n * tokens / wall, 1000 * wall / tokens)


async def engine_run(engine: Engine, plan: list[tuple[Adapter | None, str]], vocab: int, tokens: int,
                     name: str) -> Run:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    tpots = await asyncio.gather(*(_one(engine, p, params, a, m) for p, (a, m) in zip(prompts(len(plan), vocab), plan)))
    wall = time.perf_counter() - started
    return Run(name, len(plan), len(plan) * tokens / wall, 1000 * statistics.median(tpots))


async def _one(engine: Engine, prompt: list[int], params: SamplingParams, adapter: Adapter | None, mode: str) -> float:
    times = []
    async for event in engine.generate(prompt, params, adapter, mode):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
        elif isinstance(event, DoneEvent) and event.error is not None:
            raise event.error
    return (times[-1] - times[0]) / max(len(times) - 1, 1)


def plans(adapters: dict[str, Adapter], n: int) -> list[tuple[str, list[tuple[Adapter | None, str]]]]:
    """Base interleaved between the variants."""
    loras = [adapters[f"lora-{i}"] for i in range(N_LORAS)]
    variants = [
        ("lora-32-unmerged", [(loras[i % N_LORAS], "unmerged") for i in range(n)]),
        ("prompt", [(adapters["prompt"], "none")] * n),
        ("bottleneck", [(adapters["bottleneck"], "none")] * n),
        ("lora-merged", [(loras[0], "merged")] * n),
    ]
    base = ("base", [(None, "none")] * n)
    return [base] + [step for variant in variants for step in (variant, base)]


async def run_all(engine: Engine, adapters: dict[str, Adapter], args: argparse.Namespace, vocab: int) -> list[Run]:
    runs = []
    for n in args.concurrency:
        await engine_run(engine, [(None, "none")] * n, vocab, 2, "warm-up")
        for name, plan in plans(adapters, n):
            runs.append(await engine_run(engine, plan, vocab, args.tokens, name))
            _print(runs[-1])
        if engine.graphs is not None:  # CUDA: base and 32 LoRAs once more with the decode graphs off
            for name, plan in plans(adapters, n)[:2]:
                runs.append(await eager_run(engine, plan, vocab, args.tokens, f"{name}-eager"))
                _print(runs[-1])
    return runs


async def eager_run(engine: Engine, plan: list[tuple[Adapter | None, str]], vocab: int, tokens: int,
                    name: str) -> Run:
    """`engine_run` with the engine's decode graphs off (set on the engine thread, between steps)."""
    graphs = engine.graphs
    engine.call(lambda: setattr(engine, "graphs", None))
    try:
        return await engine_run(engine, plan, vocab, tokens, name)
    finally:
        engine.call(lambda: setattr(engine, "graphs", graphs))


def _print(run: Run) -> None:
    print(f"{run.scenario:<18} x{run.concurrency:<4} {run.tokens_per_s:9.1f} tok/s  step {run.step_ms:7.2f} ms",
          file=sys.stderr, flush=True)


def report(runs: list[Run], peers: list[Run], floor_ms: float) -> dict:
    rows = []
    for n in sorted({r.concurrency for r in runs}):
        at = [r for r in runs if r.concurrency == n]
        bases = [i for i, r in enumerate(at) if r.scenario == "base"]
        peer = next(p for p in peers if p.concurrency == n)
        for i, r in enumerate(at):
            near = [at[j].tokens_per_s for j in bases if abs(j - i) == 1] or [at[bases[0]].tokens_per_s]
            rows.append({**r.__dict__, "vs_base_beside": r.tokens_per_s / statistics.mean(near),
                         "step_vs_floor": r.step_ms / floor_ms, "vs_hf_generate": r.tokens_per_s / peer.tokens_per_s})
    return {"floor_ms": floor_ms, "runs": rows, "hf_generate": [p.__dict__ for p in peers]}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = build_base(args.tiny, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.hf.parameters())
    floor_ms = 1000 * weight_bytes / copy_bandwidth(device)
    print(f"memory floor {floor_ms:.2f} ms a step ({weight_bytes / 1e9:.2f} GB of weights)", file=sys.stderr, flush=True)
    peers = []
    for n in args.concurrency:  # each printed as it comes: a run cut off by its time limit keeps what it measured
        peers.append(hf_generate(base, n, args.tokens))
        _print(peers[-1])
    with tempfile.TemporaryDirectory(prefix="hotswap-gpu-") as scratch:
        root = Path(scratch)
        adapters = {f"lora-{i}": load(base, f"lora-{i}", write_lora(root / f"lora-{i}", base, i)) for i in range(N_LORAS)}
        adapters["prompt"] = load(base, "prompt", write_prompt(root / "prompt", base))
        adapters["bottleneck"] = load(base, "bottleneck", write_bottleneck(root / "bottleneck", base))
    longest = max(args.concurrency)
    engine = Engine(base, EngineSettings(max_batch_size=longest, max_batch_tokens=longest * 4096,
                                         max_waiting=4 * longest), Metrics())
    engine.start()
    engine.wait_ready()
    try:
        runs = asyncio.run(run_all(engine, adapters, args, base.geometry.vocab))
    finally:
        engine.stop(30)
    out = report(runs, peers, floor_ms) | {"device": str(device), "dtype": str(base.dtype), "weight_bytes": weight_bytes,
                                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
