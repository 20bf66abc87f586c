"""In-process reference numbers: plain transformers and PEFT on the same model, adapters and prompts.

    python -m load_tests.peft_baseline [--models DIR] [--quick] [--json out.json]

fp32 on CPU. Each measurement runs once briefly to warm up, then once timed:
  base-static-8         HF `generate`, one static batch of 8 prompts, no adapter
  lora-mixed-8          PEFT mixed-adapter batch: `generate(adapter_names=[lora-0..7])`
  lora-sequential-32x8  PEFT serving one request at a time: `set_adapter`, `generate`, for 32 requests over 8 LoRAs
  prompt-8              PEFT prompt tuning, batch of 8 (its `generate` when correct, else a cache-less
                        greedy loop over its `forward`: PEFT 0.21.2 re-inserts the virtual tokens at
                        every step on transformers 5)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from load_tests.layout import DEFAULT_MODELS_DIR, PROMPT_ADAPTER, RESIDENT_LORAS, BenchLayout, lora_name, lora_names
from load_tests.prompts import make_prompts
from load_tests.report import baseline_json, format_baseline
from load_tests.stats import BaselineResult

WARMUP_TOKENS = 2
CHECK_TOKENS = 4  # tokens compared between PEFT's prompt-tuning generate and its forward
SEQUENTIAL_REQUESTS = 32
BATCH = 8
PAD_TOKEN_ID = 1


@dataclass(frozen=True)
class BaselineSettings:
    max_new_tokens: int = 64
    seed: int = 0
    threads: int = 2


def _ids(prompts: list[list[int]]) -> torch.Tensor:
    return torch.tensor(prompts, dtype=torch.long)  # [B, T]; every prompt has the same length


def hf_generate(
    model: PreTrainedModel | PeftModel, ids: torch.Tensor, new_tokens: int, **kwargs: object
) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=PAD_TOKEN_ID,
        **kwargs,
    )
    return out[:, ids.shape[1]:]  # [B, new_tokens]


def greedy_without_cache(model: PeftModel, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence through `model.forward` per token."""
    sequence = ids  # [B, T + generated]
    for _ in range(new_tokens):
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits  # [B, S, V]
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, ids.shape[1]:]


def measure(name: str, method: str, run: Callable[[int], torch.Tensor], new_tokens: int) -> BaselineResult:
    """`run(n)` generates n tokens per row and returns them; warm up once, then time one run."""
    run(WARMUP_TOKENS)
    started = time.perf_counter()
    generated = run(new_tokens)
    return BaselineResult(name, method, tokens=generated.numel(), seconds=time.perf_counter() - started)


def _one_at_a_time(model: PeftModel, prompts: list[list[int]], adapters: list[str], new_tokens: int) -> torch.Tensor:
    outputs = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        model.set_adapter(adapter)
        outputs.append(hf_generate(model, _ids([prompt]), new_tokens))
    return torch.cat(outputs)


def prompt_generate_is_correct(model: PeftModel, ids: torch.Tensor) -> bool:
    return torch.equal(hf_generate(model, ids, CHECK_TOKENS), greedy_without_cache(model, ids, CHECK_TOKENS))


def measure_prompt(model: PeftModel, ids: torch.Tensor, new_tokens: int) -> BaselineResult:
    if prompt_generate_is_correct(model, ids[:1]):
        return measure("prompt-8", "PEFT prompt tuning generate", partial(hf_generate, model, ids), new_tokens)
    method = "PEFT prompt tuning forward, greedy loop without KV cache (its generate is wrong on transformers 5)"
    return measure("prompt-8", method, partial(greedy_without_cache, model, ids), new_tokens)


def _load_loras(base: PreTrainedModel, layout: BenchLayout) -> PeftModel:
    model = PeftModel.from_pretrained(base, layout.adapter_dir(lora_name(0)), adapter_name=lora_name(0))
    for name in lora_names(RESIDENT_LORAS)[1:]:
        model.load_adapter(layout.adapter_dir(name), adapter_name=name)
    return model.eval()


def measure_loras(model: PeftModel, settings: BaselineSettings) -> list[BaselineResult]:
    batch_ids = _ids(make_prompts(BATCH, settings.seed))
    adapters = lora_names(RESIDENT_LORAS)
    sequential_prompts = make_prompts(SEQUENTIAL_REQUESTS, settings.seed)
    sequential_adapters = [adapters[i % RESIDENT_LORAS] for i in range(SEQUENTIAL_REQUESTS)]
    mixed = partial(hf_generate, model, batch_ids, adapter_names=adapters)
    sequential = partial(_one_at_a_time, model, sequential_prompts, sequential_adapters)
    return [
        measure("lora-mixed-8", "PEFT generate(adapter_names=[lora-0..7])", mixed, settings.max_new_tokens),
        measure("lora-sequential-32x8", "PEFT set_adapter + generate, one request at a time", sequential,
                settings.max_new_tokens),
    ]


def run_baseline(layout: BenchLayout, settings: BaselineSettings, log: Callable[[str], None]) -> list[BaselineResult]:
    layout.require_built()
    torch.set_num_threads(settings.threads)
    batch_ids = _ids(make_prompts(BATCH, settings.seed))
    base = AutoModelForCausalLM.from_pretrained(layout.model_dir, dtype=torch.float32).eval()
    results: list[BaselineResult] = []

    def record(new: list[BaselineResult]) -> None:
        results.extend(new)
        for result in new:
            log(f"{result.name}: {result.tokens_per_s:.1f} tok/s ({result.method})")

    with torch.inference_mode():
        static = partial(hf_generate, base, batch_ids)
        record([measure("base-static-8", "HF generate, static batch", static, settings.max_new_tokens)])
        prompt_model = PeftModel.from_pretrained(base, layout.adapter_dir(PROMPT_ADAPTER)).eval()
        record([measure_prompt(prompt_model, batch_ids, settings.max_new_tokens)])
        record(measure_loras(_load_loras(base, layout), settings))  # injects LoRA layers into `base`
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--quick", action="store_true", help="16 new tokens instead of 64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    settings = BaselineSettings(max_new_tokens=16 if args.quick else 64, threads=args.threads)
    results = run_baseline(BenchLayout(args.models), settings, lambda line: print(line, file=sys.stderr, flush=True))
    print(format_baseline(results))
    if args.json:
        args.json.write_text(json.dumps(baseline_json(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
