"""Bottleneck adapters on the AdapterHub families beyond the fixtures: Mistral (full attention) is Llama's
architecture, so tiny-llama's weights served as a Mistral must reproduce the AdapterHub references."""
from __future__ import annotations

import json
import shutil

import torch

from server.model import load_base_model
from tests.adapters.test_bottleneck import HUB_ADAPTERS, generate, hub_adapter, references
from tests.conftest import LLAMA


def test_mistral_matches_adapterhub_references_of_the_same_weights(tmp_path):
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(LLAMA / name, tmp_path / name)
    config = json.loads((LLAMA / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    bm = load_base_model(tmp_path, device="cpu", dtype="float32")
    assert bm.hf.config.model_type == "mistral"
    ref = references("tiny-llama")
    for name in HUB_ADAPTERS:
        adapter = hub_adapter("tiny-llama", name, bm)
        tokens, logits = generate(bm, ref["prompts"], [adapter] * len(ref["prompts"]))
        assert tokens == ref["adapters"][name]["outputs"]
        for row, top5 in zip(logits[:, 0], ref["adapters"][name]["last_logits_top5"]):
            values, ids = row.topk(5)
            assert ids.tolist() == [t for t, _ in top5]
            assert torch.allclose(values, torch.tensor([v for _, v in top5]), atol=1e-4)
