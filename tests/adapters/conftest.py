"""Tiny base models and PEFT LoRA adapters for the adapter tests: the fixtures, and more made here with peft."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASES = {"llama": FIXTURES / "tiny-llama", "gpt2": FIXTURES / "tiny-gpt2"}
FIXTURE_ADAPTERS = {
    "qv-r8": ("llama", FIXTURES / "peft" / "tiny-llama" / "lora-qv-r8"),
    "all-r16": ("llama", FIXTURES / "peft" / "tiny-llama" / "lora-all-r16"),
    "cattn-r8": ("gpt2", FIXTURES / "peft" / "tiny-gpt2" / "lora-cattn-r8"),
}
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (base, LoraConfig arguments); weights random (init_lora_weights=False), DoRA magnitudes and
# saved base biases perturbed so that neither is a no-op.
GENERATED = {
    "qkvo-mlp-r8": ("llama", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_ALL}),
    "rslora-r4": ("llama", {"r": 4, "lora_alpha": 8, "use_rslora": True,
                            "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "patterns": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                           "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                           "alpha_pattern": {"v_proj": 3, "o_proj": 32}}),
    "layers": ("llama", {"r": 4, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1, 3],
                         "layers_pattern": "layers"}),
    "regex-exclude": ("llama", {"r": 2, "target_modules": r".*\.(q|k|gate)_proj",
                                "exclude_modules": ["layers.0.mlp.gate_proj"]}),
    "r1": ("llama", {"r": 1, "lora_alpha": 2, "target_modules": ["o_proj", "gate_proj"]}),
    "dora": ("llama", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj", "up_proj"]}),
    "lora-bias": ("llama", {"r": 4, "lora_bias": True, "target_modules": ["k_proj", "down_proj"]}),
    "gpt2-dora": ("gpt2", {"r": 4, "use_dora": True, "bias": "lora_only", "fan_in_fan_out": True,
                           "target_modules": ["c_attn", "c_proj"]}),
    "gpt2-bias": ("gpt2", {"r": 4, "lora_bias": True, "bias": "all", "fan_in_fan_out": True,
                           "target_modules": ["c_attn", "c_fc"]}),
    "gpt2-all-linear": ("gpt2", {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True, "target_modules": "all-linear",
                                 "exclude_modules": ["c_fc"]}),
    # lm_head a target: PEFT saves the head's base weight too (save_embedding_layers, by default)
    "head": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest and immune to a busy machine (2 threads can be 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_base(base: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(BASES[base], local_files_only=True, dtype=torch.float32).eval()


def peft_model(base: str, folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_base(base), folder).eval()


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
            elif name.endswith("base_layer.bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def make_adapter(folder: Path, base: str, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base), LoraConfig(init_lora_weights=False, **config))
        _perturb(model, torch.Generator().manual_seed(seed))
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """name -> (base, folder) for the fixture adapters and the generated ones."""
    root = tmp_path_factory.mktemp("lora")
    dirs = dict(FIXTURE_ADAPTERS)
    for seed, (name, (base, config)) in enumerate(GENERATED.items()):
        dirs[name] = (base, make_adapter(root / name, base, seed, **config))
    _save_all_linear_literally(dirs["gpt2-all-linear"][1])
    return dirs


def _save_all_linear_literally(folder: Path) -> None:
    """PEFT saves "all-linear" expanded; write it back as the shorthand, which PEFT expands again on load."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = "all-linear"
    path.write_text(json.dumps(config))
