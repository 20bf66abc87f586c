"""Load and freeze the base model: any local Hugging Face causal-LM folder of a supported family."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.adapters.lora import LoraContext
from server.decoder import FAMILIES, Decoder
from server.linear import use_onednn_linears

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


class ModelLoadError(Exception):
    """The base model folder cannot be served."""


@dataclass(frozen=True)
class Geometry:
    """The numbers of the base model that the engine and adapters check against."""

    n_layers: int
    hidden: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    max_len: int


@dataclass
class BaseModel:
    name: str
    hf: nn.Module
    decoder: Decoder
    tokenizer: PreTrainedTokenizerBase
    geometry: Geometry
    eos_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype
    lora_ctx: LoraContext  # read by the LoRA wrappers installed on `hf`; the engine sets its plan


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ModelLoadError(f"--dtype: expected one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


def load_base_model(model_dir: Path | None, device: str = "auto", dtype: str = "auto", onednn: bool = True) -> BaseModel:
    folder = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"--model: expected a folder with config.json, got {str(folder)!r}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    _check_supported(config)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dt).to(dev)
    hf.eval().requires_grad_(False)
    if onednn and dev.type == "cpu" and dt == torch.float32:
        log.info("oneDNN matmul for %d linear layers", use_onednn_linears(hf))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    decoder = FAMILIES[config.model_type](hf)
    log.info("loaded %s (%s, %s params) on %s as %s", folder, config.model_type, _param_count(hf), dev, dt)
    return BaseModel(
        name=folder.name,
        hf=hf,
        decoder=decoder,
        tokenizer=tokenizer,
        geometry=_geometry(config, decoder),
        eos_ids=_eos_ids(hf, tokenizer),
        device=dev,
        dtype=dt,
        lora_ctx=LoraContext(),
    )


def _check_supported(config) -> None:
    if config.model_type not in FAMILIES:
        raise ModelLoadError(f"model_type: expected one of {sorted(FAMILIES)}, got {config.model_type!r}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        if config.sliding_window < config.max_position_embeddings:
            raise ModelLoadError(f"sliding_window: expected none (full attention), got {config.sliding_window}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise ModelLoadError(f"{flag}: expected false, got true")


def _geometry(config, decoder: Decoder) -> Geometry:
    if config.model_type == "gpt2":
        return Geometry(config.n_layer, config.n_embd, config.n_head, config.n_embd // config.n_head,
                        config.vocab_size, config.n_positions)
    return Geometry(
        config.num_hidden_layers,
        config.hidden_size,
        config.num_key_value_heads or config.num_attention_heads,
        decoder.head_dim,
        config.vocab_size,
        config.max_position_embeddings,
    )


def _eos_ids(hf: nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (hf.generation_config, hf.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _param_count(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
