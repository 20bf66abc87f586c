"""Pre-train the embedded default model on the Python standard library (`make default-model`).

Deterministic given --seed and --threads: a Llama of ~5M parameters (the geometry and tokenizer of
`default_model/config.json`), context 1,024, bf16 autocast on CPU with fp32 weights, AdamW, cosine
schedule. Writes model.safetensors, config.json and training.json (the final numbers) to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from scripts import corpus
from scripts.training import fit, perplexity, seed_everything

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("default_model"), help="folder with config.json and the tokenizer")
    p.add_argument("--out", type=Path, default=Path("default_model"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=300)
    return p.parse_args()


def build_model(config_dir: Path) -> LlamaForCausalLM:
    config = LlamaConfig.from_pretrained(config_dir)
    config.max_position_embeddings = max(config.max_position_embeddings, 2048)
    return LlamaForCausalLM(config)


def sample(model, tokenizer: Tokenizer, prompt: str, n: int = 48) -> str:
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=1)
    return tokenizer.decode(out[0].tolist())


def train(args: argparse.Namespace) -> dict:
    generator = seed_everything(args.seed, args.threads)
    tokenizer = Tokenizer.from_file(str(args.config / "tokenizer.json"))
    data = corpus.code()
    train_windows = corpus.windows(corpus.tokenize(tokenizer, data.train), args.context)
    held_out = corpus.windows(corpus.tokenize(tokenizer, data.held_out), args.context)
    model = build_model(args.config)
    random_ppl = perplexity(model, held_out[:16])
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {train_windows.numel()} training tokens; "
          f"{held_out.numel()} held-out; random-weights ppl {random_ppl:.0f}", flush=True)
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        if step % args.eval_every == 0:
            print(f"step {step} held-out ppl (first 32 windows) {perplexity(model, held_out[:32]):.2f}", flush=True)

    loss = fit(model, list(model.parameters()), train_windows, generator, steps=args.steps,
               batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, log_every=args.log_every, on_step=evaluate)
    minutes = (time.perf_counter() - start) / 60
    return {
        "steps": args.steps, "batch_size": args.batch_size, "context": args.context, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "training_tokens_seen": args.steps * args.batch_size * args.context,
        "corpus_tokens": train_windows.numel(), "final_train_loss": round(loss, 4),
        "held_out_tokens": held_out.numel(), "held_out_ppl": round(perplexity(model, held_out), 3),
        "random_weights_ppl": round(random_ppl, 1), "wall_minutes": round(minutes, 1),
        "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "sample": sample(model, tokenizer, "def fibonacci(n):"), "model": model,
    }


def save(result: dict, args: argparse.Namespace) -> None:
    model = result.pop("model")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if args.config.resolve() != args.out.resolve():
            shutil.copyfile(args.config / name, args.out / name)
    (args.out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    args = parse_args()
    save(train(args), args)


if __name__ == "__main__":
    main()
