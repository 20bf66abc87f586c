"""Build the bench model and its adapters, offline and deterministically.

    python -m load_tests.build_bench_model --out load_tests/models [--churn] [--bf16]

Writes `<out>/bench-llama/` (a ~75M-parameter random Llama, fp32 safetensors, with the tiny-llama
tokenizer) and, next to it, `<out>/<adapter name>/`: PEFT LoRAs `lora-0..7` (`lora-8..63` with --churn), PEFT
prompt tuning `prompt-20`, AdapterHub `seq_bn-rf16` and `double_seq_bn-rf16`, and `bn-0..7` (seq_bn and
double_seq_bn in turn, for batches of many bottleneck adapters); with --bf16, `lora-bf16-0..31`: lora-i's
tensors saved in bfloat16 (its A and B rounded), as PEFT saves a LoRA trained in it. Anything already on
disk is kept; each folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from load_tests.adapterhub import BaseModelInfo, BottleneckSpec, write_adapter
from load_tests.layout import (
    CHURN_LORAS,
    DEFAULT_MODELS_DIR,
    DOUBLE_SEQ_BN_ADAPTER,
    MIXED_BOTTLENECKS,
    MODEL_NAME,
    PROMPT_ADAPTER,
    RESIDENT_LORAS,
    SEQ_BN_ADAPTER,
    BenchLayout,
    bf16_lora_name,
    bottleneck_name,
    lora_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAFETENSORS = "adapter_model.safetensors"
BF16_LORAS = 32  # the lora-32x32-bf16 scenario's
TOKENIZER_SOURCE = REPO_ROOT / "tests" / "fixtures" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EOS_TOKEN_ID = 0
BASE_SEED = 0
LORA_SEED = 1000
PROMPT_SEED = 2000
BOTTLENECK_SEED = 3000
BOTTLENECKS = (
    BottleneckSpec(SEQ_BN_ADAPTER, "seq_bn", reduction_factor=16, non_linearity="relu"),
    BottleneckSpec(DOUBLE_SEQ_BN_ADAPTER, "double_seq_bn", reduction_factor=16, non_linearity="swish"),
    *(BottleneckSpec(bottleneck_name(i), "double_seq_bn" if i % 2 else "seq_bn", reduction_factor=16,
                     non_linearity="swish" if i % 2 else "relu") for i in range(MIXED_BOTTLENECKS)),
)


def bench_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=2048,
        bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=1,
    )


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `target` only if the block completes."""
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    yield scratch
    scratch.rename(target)


def build_base(model_dir: Path) -> None:
    torch.manual_seed(BASE_SEED)
    model = LlamaForCausalLM(bench_config())
    with torch.no_grad():
        # A zero head row gives EOS logit 0 while the max over 4095 random logits is positive, so
        # greedy decoding never stops early and every request yields exactly max_new_tokens.
        model.lm_head.weight[EOS_TOKEN_ID].zero_()
    with _atomic_dir(model_dir) as scratch:
        model.save_pretrained(scratch)
        for name in TOKENIZER_FILES:
            shutil.copyfile(TOKENIZER_SOURCE / name, scratch / name)


def load_base(model_dir: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.name_or_path = MODEL_NAME
    return model.eval()


def _save_peft(model: PeftModel, target: Path) -> None:
    with _atomic_dir(target) as scratch:
        model.save_pretrained(str(scratch), save_embedding_layers=False)  # no hub lookup
        (scratch / "README.md").unlink(missing_ok=True)  # PEFT's model card; not part of the format


def build_lora(base: torch.nn.Module, index: int, target: Path) -> torch.nn.Module:
    """Save one LoRA and hand back the base model with the LoRA layers removed."""
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random A and B: the adapter changes the outputs
    )
    torch.manual_seed(LORA_SEED + index)
    peft_model = get_peft_model(base, config)
    _save_peft(peft_model, target)
    return peft_model.unload()


def build_bf16_lora(source: Path, target: Path) -> None:
    """`source`'s config and its tensors in bfloat16."""
    tensors = safetensors.torch.load_file(source / SAFETENSORS)
    with _atomic_dir(target) as scratch:
        shutil.copy(source / "adapter_config.json", scratch)
        safetensors.torch.save_file({k: t.to(torch.bfloat16) for k, t in tensors.items()}, scratch / SAFETENSORS)


def build_prompt(base: torch.nn.Module, target: Path) -> None:
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=20,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    torch.manual_seed(PROMPT_SEED)
    _save_peft(get_peft_model(base, config), target)


def base_info(config: LlamaConfig) -> BaseModelInfo:
    return BaseModelInfo(
        name=MODEL_NAME,
        model_class="LlamaForCausalLM",
        model_type="llama",
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
    )


def build_bottlenecks(layout: BenchLayout) -> None:
    info = base_info(bench_config())
    for offset, spec in enumerate(BOTTLENECKS):
        target = layout.adapter_dir(spec.name)
        if not target.exists():
            with _atomic_dir(target) as scratch:
                write_adapter(scratch, spec, info, seed=BOTTLENECK_SEED + offset)


def build_all(layout: BenchLayout, lora_count: int, bf16: bool = False) -> None:
    if not layout.model_dir.exists():
        build_base(layout.model_dir)
    base: torch.nn.Module = load_base(layout.model_dir)
    for index in range(lora_count):
        target = layout.adapter_dir(lora_name(index))
        if not target.exists():
            base = build_lora(base, index, target)
    if not layout.adapter_dir(PROMPT_ADAPTER).exists():
        build_prompt(base, layout.adapter_dir(PROMPT_ADAPTER))
    build_bottlenecks(layout)
    for index in range(BF16_LORAS if bf16 else 0):
        if not layout.adapter_dir(bf16_lora_name(index)).exists():
            build_bf16_lora(layout.adapter_dir(lora_name(index)), layout.adapter_dir(bf16_lora_name(index)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--churn", action="store_true", help=f"also build lora-{RESIDENT_LORAS}..{CHURN_LORAS - 1}")
    parser.add_argument("--bf16", action="store_true", help=f"also build lora-bf16-0..{BF16_LORAS - 1} (and lora-8..63)")
    args = parser.parse_args(argv)
    layout = BenchLayout(args.out)
    build_all(layout, CHURN_LORAS if args.churn or args.bf16 else RESIDENT_LORAS, args.bf16)
    print(f"bench model and adapters ready under {args.out}")


if __name__ == "__main__":
    main()
