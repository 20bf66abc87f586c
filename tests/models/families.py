"""Tiny random base models, one per supported family, each with the config features that family is known for."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import LLAMA

VOCAB = 4096  # tiny-llama's tokenizer, copied into every folder
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
          "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
WINDOW = 4  # sliding windows shorter than the test prompts (up to 11 tokens)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

# model_type -> config overrides (on top of COMMON, except gpt2)
FAMILIES: dict[str, dict] = {
    "llama": {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": False},
    "mistral": {"sliding_window": WINDOW, "tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},  # q/k/v biases
    "qwen3": {"tie_word_embeddings": False},  # q/k norms
    "gemma2": {"sliding_window": WINDOW, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0,
               "query_pre_attn_scalar": 24},  # sliding/global layers, sandwich norms, sqrt(H) embedding scale
    "gemma3_text": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                    "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 24},
    "phi3": {"tie_word_embeddings": False},  # fused qkv_proj and gate_up_proj
    "olmo2": {"tie_word_embeddings": False},  # post-norms, q/k norms over all heads
    "granite": {"embedding_multiplier": 3.0, "logits_scaling": 2.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.2, "tie_word_embeddings": False},
    "smollm3": {"no_rope_layer_interval": 2, "tie_word_embeddings": False},  # layer 1 without rotary
    "gpt2": {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256,
             "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                  "tie_word_embeddings": False},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
}
MOE = ("qwen3_moe", "mixtral")
# PEFT target_modules naming each family's attention projections
ATTENTION_TARGETS: dict[str, list[str] | str] = {
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": r".*\.attn\.(c_attn|c_proj)",
}
DEFAULT_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def config_of(family: str):
    overrides = FAMILIES[family]
    return AutoConfig.for_model(family, **overrides if family == "gpt2" else {**COMMON, **overrides})


def build(family: str, folder: Path) -> Path:
    """Save a random `family` model (fixed seed) with tiny-llama's tokenizer into `folder`."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config_of(family)).eval()
        model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA / name, folder / name)
    return folder


def attention_targets(family: str) -> list[str] | str:
    return ATTENTION_TARGETS.get(family, DEFAULT_ATTENTION_TARGETS)
