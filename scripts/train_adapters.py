"""Train the example adapters on the default model (`make example-adapters`), one of each kind.

- `docstring-lora` (Hugging Face PEFT LoRA, r=16 on every linear layer): trained on the stdlib's
  documented functions cut to `def` line + docstring, it answers a `def` line with a docstring.
- `unittest-prompt` (PEFT prompt tuning, 32 virtual tokens): trained on the stdlib's test suite, it
  steers the model toward `unittest` test code.
- `prose-bottleneck` (this script's own trainer, AdapterHub `seq_bn` layout): trained on the
  language reference shipped as `pydoc_data/topics.py`, it writes English documentation prose.

Deterministic given --seed and --threads. Each folder is written in the format its library saves
(PEFT: adapter_config.json + adapter_model.safetensors; AdapterHub: adapter_config.json +
adapter.safetensors) under --out, with train.json holding the held-out perplexities with and without.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn
from transformers import LlamaForCausalLM

from scripts import corpus
from scripts.training import fit, perplexity, seed_everything

# AdapterHub 1.3.0's SeqBnConfig ("seq_bn", Pfeiffer) as it writes it into adapter_config.json.
SEQ_BN = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("default_model"))
    p.add_argument("--out", type=Path, default=Path("examples"))
    p.add_argument("--only", choices=["lora", "prompt", "bottleneck"], action="append", help="train only these")
    p.add_argument("--steps", type=int, help="override every recipe's step count (smoke runs)")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


HELD_OUT_TOKENS = 32768  # at most this many held-out tokens are scored per adapter
NUM_VIRTUAL_TOKENS = 32


class Data:
    """One sub-corpus as training and held-out windows [n, context]."""

    def __init__(self, subcorpus: str, tokenizer: Tokenizer, context: int) -> None:
        split = corpus.SUBCORPORA[subcorpus]()
        self.name = subcorpus
        self.train = corpus.windows(corpus.tokenize(tokenizer, split.train), context)
        self.held_out = corpus.windows(corpus.tokenize(tokenizer, split.held_out), context)[: HELD_OUT_TOKENS // context]


def frozen_base(folder: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    return model


def train_lora(args, base: Path, data: Data, out: Path, recipe: Recipe) -> dict:
    model = get_peft_model(frozen_base(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    return _fit_and_save(args, model, data, out, recipe, save=lambda: model.save_pretrained(out))


def train_prompt(args, base: Path, data: Data, out: Path, recipe: Recipe) -> dict:
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, tokenizer_name_or_path=str(base),
                                prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text="import unittest\n\nclass Test")
    model = get_peft_model(frozen_base(base), config)
    return _fit_and_save(args, model, data, out, recipe, save=lambda: model.save_pretrained(out))


class SeqBottleneck(nn.Module):
    """AdapterHub seq_bn at one layer's output y: y + up(relu(down(y))); up starts at zero (identity)."""

    def __init__(self, hidden: int, reduction_factor: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, hidden // reduction_factor)
        self.up = nn.Linear(hidden // reduction_factor, hidden)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: [batch, length, hidden] -> [batch, length, hidden]."""
        return y + self.up(torch.relu(self.down(y)))


def train_bottleneck(args, base: Path, data: Data, out: Path, recipe: Recipe, reduction_factor: int = 8) -> dict:
    model = frozen_base(base)
    layers = model.model.layers
    adapters = nn.ModuleList(SeqBottleneck(model.config.hidden_size, reduction_factor) for _ in layers)
    for layer, adapter in zip(layers, adapters):
        layer.register_forward_hook(lambda _m, _i, y, a=adapter: (a(y[0]), *y[1:]) if isinstance(y, tuple) else a(y))

    def save() -> None:
        name = out.name
        tensors = {}
        for i, a in enumerate(adapters):
            prefix = f"model.layers.{i}.output_adapters.adapters.{name}"
            tensors |= {f"{prefix}.adapter_down.0.weight": a.down.weight, f"{prefix}.adapter_down.0.bias": a.down.bias,
                        f"{prefix}.adapter_up.weight": a.up.weight, f"{prefix}.adapter_up.bias": a.up.bias}
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
        config = {"config": {**SEQ_BN, "reduction_factor": reduction_factor}, "hidden_size": model.config.hidden_size,
                  "model_class": "LlamaForCausalLM", "model_name": "hotswap-default", "model_type": "llama",
                  "name": name, "version": "adapters.1.3.0"}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return _fit_and_save(args, model, data, out, recipe, save=save, params=list(adapters.parameters()))


def _fit_and_save(args, model, data: Data, out: Path, recipe: Recipe, *, save, params: list | None = None) -> dict:
    params = params or [p for p in model.parameters() if p.requires_grad]
    generator = seed_everything(args.seed, args.threads)
    base_ppl = _base_perplexity(model, data.held_out)
    batch_size, steps = args.tokens_per_step // data.train.shape[1], args.steps or recipe.steps
    loss = fit(model, params, data.train, generator, steps=steps, batch_size=batch_size, lr=recipe.lr,
               warmup=max(1, steps // 10))
    result = {"corpus": data.name, "trainable_parameters": sum(p.numel() for p in params), "steps": steps,
              "batch_size": batch_size, "context": data.train.shape[1], "lr": recipe.lr, "seed": args.seed,
              "final_train_loss": round(loss, 4), "held_out_tokens": data.held_out.numel(),
              "held_out_ppl_base": round(base_ppl, 3), "held_out_ppl_adapter": round(perplexity(model, data.held_out), 3)}
    save()
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(out.name, json.dumps(result), flush=True)
    return result


def _base_perplexity(model, held_out: torch.Tensor) -> float:
    """Before training: a PEFT model with its adapter off; the bottleneck starts as the identity (up = 0)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return perplexity(model, held_out)
    return perplexity(model, held_out)


@dataclass(frozen=True)
class Recipe:
    name: str
    subcorpus: str
    train: Callable
    context: int  # window length for training and the held-out perplexity
    lr: float
    steps: int


# A soft prompt steers what follows it, so it trains (and is measured) on 128-token windows: the
# start of a file, where a prefix matters; the others see 512.
KINDS = {
    "lora": Recipe("docstring-lora", "docstrings", train_lora, 512, 2e-3, 200),
    "prompt": Recipe("unittest-prompt", "tests", train_prompt, 128, 1e-1, 300),
    "bottleneck": Recipe("prose-bottleneck", "prose", train_bottleneck, 512, 2e-3, 200),
}


def main() -> None:
    args = parse_args()
    tokenizer = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    for kind in args.only or list(KINDS):
        recipe = KINDS[kind]
        data = Data(recipe.subcorpus, tokenizer, recipe.context)
        recipe.train(args, args.base, data, args.out / recipe.name, recipe)


if __name__ == "__main__":
    main()
