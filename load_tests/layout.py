"""Where the bench model and its adapters live on disk, and what they are called."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAME = "bench-llama"
RESIDENT_LORAS = 8
CHURN_LORAS = 64
PROMPT_ADAPTER = "prompt-20"
SEQ_BN_ADAPTER = "seq_bn-rf16"
DOUBLE_SEQ_BN_ADAPTER = "double_seq_bn-rf16"
MIXED_BOTTLENECKS = 8  # bn-0..7: seq_bn (even) and double_seq_bn (odd), rf 16, for rows of many adapters


def bottleneck_name(index: int) -> str:
    return f"bn-{index}"


def lora_name(index: int) -> str:
    return f"lora-{index}"


def lora_names(count: int) -> list[str]:
    return [lora_name(i) for i in range(count)]


def bf16_lora_name(index: int) -> str:
    """lora-i's weights saved in bfloat16 (as PEFT saves a LoRA trained in it): `build_bench_model --bf16`."""
    return f"lora-bf16-{index}"


@dataclass(frozen=True)
class BenchLayout:
    """The folder tree written by `build_bench_model` and read by the bench and the baseline."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_NAME

    def adapter_dir(self, name: str) -> Path:
        return self.root / name

    def require_built(self) -> None:
        missing = [p for p in [self.model_dir, *map(self.adapter_dir, self.served_adapters())] if not p.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{missing[0]} is missing; run `python -m load_tests.build_bench_model --out {self.root}`"
            )

    def served_adapters(self) -> list[str]:
        """Adapters registered at server start (the churn ones are uploaded on demand)."""
        return [*lora_names(RESIDENT_LORAS), PROMPT_ADAPTER, SEQ_BN_ADAPTER, DOUBLE_SEQ_BN_ADAPTER,
                *map(bottleneck_name, range(MIXED_BOTTLENECKS))]
