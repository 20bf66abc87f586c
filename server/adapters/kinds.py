"""Recognising an adapter folder's kind and loading it with that kind's loader."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from server.adapters.bottleneck import BottleneckAdapter, load_bottleneck
from server.adapters.lora import LoraAdapter, ensure_wrapped, load_lora
from server.adapters.prompt import PEFT_TYPES as PROMPT_TYPES
from server.adapters.prompt import PromptAdapter, load_prompt
from server.adapters.weights import read_config
from server.errors import AdapterFormatError
from server.model import BaseModel

Kind = Literal["lora", "prompt", "bottleneck"]
Weights = LoraAdapter | PromptAdapter | BottleneckAdapter

NATIVE_BOTTLENECK_CONFIG = "hotswap_bottleneck.json"


def detect_kind(folder: Path) -> Kind:
    """PEFT folders name their `peft_type`; AdapterHub folders nest a `config` with the architecture."""
    if (folder / NATIVE_BOTTLENECK_CONFIG).is_file():
        return "bottleneck"
    cfg = read_config(folder)
    peft_type = cfg.get("peft_type")
    if peft_type == "LORA":
        return "lora"
    if peft_type in PROMPT_TYPES:
        return "prompt"
    if peft_type is None and isinstance(cfg.get("config"), dict):
        return "bottleneck"
    raise AdapterFormatError("peft_type", f"LORA, {', '.join(PROMPT_TYPES)} or an AdapterHub bottleneck config", peft_type)


def load_weights(folder: Path, base: BaseModel) -> tuple[Kind, Weights]:
    """Load and validate an adapter folder against the base model (LoRA: its modules get wrapped)."""
    kind = detect_kind(folder)
    if kind == "lora":
        lora = load_lora(folder, base.hf)
        ensure_wrapped(base.hf, lora.modules, base.lora_ctx)
        return kind, lora
    if kind == "prompt":
        return kind, load_prompt(folder, base.geometry.hidden)
    return kind, load_bottleneck(folder, base)
