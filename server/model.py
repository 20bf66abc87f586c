"""Load and freeze the base model: a local Hugging Face causal-LM folder of a supported family.

The model's own transformers code runs (server/decoder.py); a family is supported when its
tiny random config passes tests/models/ (greedy == transformers' generate, batches == rows alone,
PEFT LoRA and prompt tuning == PEFT). Anything else is refused at start-up, saying what is served.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from server.adapters.lora import LoraContext
from server.decoder import Decoder
from server.linear import use_onednn_linears
from server.residual import RESIDUAL_POINTS

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3", "gpt2",
    "qwen3_moe", "mixtral",
})  # the config model_types tested in tests/models/
SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")  # multimodal / seq2seq


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
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    base = base_from_hf(folder.name, hf, tokenizer, onednn)
    log.info("loaded %s (%s, %s params) on %s as %s", folder, config.model_type, _param_count(hf), dev, dt)
    return base


def base_from_hf(name: str, hf: nn.Module, tokenizer: PreTrainedTokenizerBase, onednn: bool = True) -> BaseModel:
    """Freeze a causal LM of a supported family already on its device (load_tests.gpu builds one
    in memory) and wrap it for serving."""
    _check_supported(hf.config)
    param = next(hf.parameters())
    hf.eval().requires_grad_(False)
    if onednn and param.device.type == "cpu" and param.dtype == torch.float32:
        log.info("oneDNN matmul for %d linear layers", use_onednn_linears(hf))
    return BaseModel(
        name=name,
        hf=hf,
        decoder=Decoder(hf, RESIDUAL_POINTS.get(hf.config.model_type)),
        tokenizer=tokenizer,
        geometry=_geometry(hf.config),
        eos_ids=_eos_ids(hf, tokenizer),
        device=param.device,
        dtype=param.dtype,
        lora_ctx=LoraContext(),
    )


def _check_supported(config) -> None:
    if config.model_type in FAMILIES:
        return
    expected = f"a decoder-only text model of a supported family ({', '.join(sorted(FAMILIES))})"
    raise ModelLoadError(f"model_type: expected {expected}, got {config.model_type!r}{_why_not(config)}")


def _why_not(config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return " (an encoder-decoder model)"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return " (an encoder-only, masked-LM architecture)"
    if any(hasattr(config, sub) for sub in SUB_CONFIGS):
        return " (a multimodal or composite model: serve its text decoder's own folder, e.g. gemma3_text)"
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return " (no causal-LM head in transformers)"
    return " (a causal LM this server has not been tested on)"


def _geometry(config) -> Geometry:
    heads = config.num_attention_heads
    return Geometry(
        config.num_hidden_layers,
        config.hidden_size,
        getattr(config, "num_key_value_heads", None) or heads,
        getattr(config, "head_dim", None) or config.hidden_size // heads,
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
