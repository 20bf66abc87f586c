"""Recognising an adapter folder's kind and loading it with that kind's loader."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from server.adapters.bottleneck import BottleneckAdapter, load_bottleneck
from server.adapters.lora import LoraAdapter, LoraDraft, derive, ensure_wrapped, read_lora
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


Draft = LoraDraft | PromptAdapter | BottleneckAdapter  # read from files; `complete` turns it into Weights


def load_weights(folder: Path, base: BaseModel) -> tuple[Kind, Weights]:
    """Load and validate an adapter folder against the base model, in one thread (scripts and checks)."""
    kind, draft = read_adapter(folder, base)
    return kind, complete(draft, base)


def read_adapter(folder: Path, base: BaseModel) -> tuple[Kind, Draft]:
    """Read and validate an adapter folder against the base model's shapes (any thread; LoRA: its modules
    get wrapped). Reads no base weight values, so a merge running meanwhile cannot skew it."""
    kind = detect_kind(folder)
    if kind == "lora":
        lora = read_lora(folder, base.hf)
        ensure_wrapped(base.hf, lora.wrapped, base.lora_ctx)
        return kind, lora
    if kind == "prompt":
        return kind, load_prompt(folder, base.geometry.hidden)
    return kind, load_bottleneck(folder, base)


def complete(draft: Draft, base: BaseModel) -> Weights:
    """What depends on the pristine base weights (LoRA: bias checks, DoRA norms); on the engine thread."""
    return derive(draft, base.hf) if isinstance(draft, LoraDraft) else draft
