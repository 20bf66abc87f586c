"""Every supported family through the model's own transformers code over our cache: greedy == generate,
batch == rows alone, PEFT LoRA (attention, all-linear; unmerged, merged, mixed) and prompt tuning == PEFT."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

from server.adapters.bottleneck import load_bottleneck
from server.adapters.kinds import load_weights
from server.adapters.lora import merge
from server.errors import AdapterFormatError
from server.model import ModelLoadError, load_base_model
from server.residual import RESIDUAL_POINTS
from tests.conftest import FIXTURES, live_server
from tests.models.conftest import NEW, PROMPTS, greedy, hf_model, reference_greedy, served
from tests.models.families import FAMILIES, MOE, attention_targets

ALL = list(FAMILIES)
ATOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() < ATOL)


@pytest.mark.parametrize("family", ALL)
def test_greedy_equals_transformers_generate(family, family_dirs):
    folder = family_dirs(family)
    ref, bm = hf_model(folder), served(folder)
    for prompt in PROMPTS:
        with torch.inference_mode():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                               pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens, logits = greedy(bm, [prompt])
        assert tokens[0] == out.sequences[0, len(prompt):].tolist()
        assert close(logits[0], torch.cat(out.logits).float())


@pytest.mark.parametrize("family", ALL)
def test_batch_of_different_lengths_equals_each_row_alone(family, family_dirs):
    bm = served(family_dirs(family))
    tokens, logits = greedy(bm, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone_tokens, alone_logits = greedy(bm, [prompt])
        assert tokens[i] == alone_tokens[0]
        assert close(logits[i], alone_logits[0])


def make_lora(base_folder: Path, folder: Path, family: str, targets, seed: int) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=family == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(hf_model(base_folder), config).save_pretrained(folder)
    return folder


def peft_reference(base_folder: Path, adapter: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(hf_model(base_folder), adapter).eval()


@pytest.mark.parametrize("family", ALL)
def test_lora_unmerged_mixed_and_merged_equal_peft(family, family_dirs, tmp_path):
    folder = family_dirs(family)
    bm = served(folder)
    paths = {"attn": make_lora(folder, tmp_path / "attn", family, attention_targets(family), seed=1)}
    if family not in MOE:
        paths["all"] = make_lora(folder, tmp_path / "all", family, "all-linear", seed=2)
    adapters = {name: load_weights(path, bm)[1] for name, path in paths.items()}
    expected = {name: [reference_greedy(peft_reference(folder, path), p) for p in PROMPTS] for name, path in paths.items()}
    base = [reference_greedy(hf_model(folder), p) for p in PROMPTS]

    rows = [("attn", 0), (None, 1), ("all", 2), ("all", 0), ("attn", 2)]  # mixed, unmerged
    rows = [(name, p) for name, p in rows if name is None or name in adapters]
    tokens, logits = greedy(bm, [PROMPTS[p] for _, p in rows], [adapters.get(name) for name, _ in rows])
    for i, (name, p) in enumerate(rows):
        want_tokens, want_logits = (expected[name] if name else base)[p]
        assert tokens[i] == want_tokens
        assert close(logits[i], want_logits)

    for name, adapter in adapters.items():  # merged: the plain forward over merged weights
        state = merge(bm.hf, adapter)
        try:
            tokens, logits = greedy(bm, PROMPTS)
        finally:
            state.restore()
        for i, (want_tokens, want_logits) in enumerate(expected[name]):
            assert tokens[i] == want_tokens
            assert close(logits[i], want_logits)
    assert greedy(bm, PROMPTS)[0] == [t for t, _ in base]  # restored


@pytest.mark.parametrize("family", MOE)
def test_moe_all_linear_is_attention_modules_plus_expert_and_router_parameters(family, family_dirs, tmp_path):
    """PEFT 0.21.2 on transformers 5: the experts are fused 3-D Parameters and the router a custom module, so
    "all-linear" becomes q/k/v/o modules plus `target_parameters` (router weight, fused experts), which
    this server refuses by name (422) rather than serve the attention part alone."""
    folder = family_dirs(family)
    every = make_lora(folder, tmp_path / "all", family, "all-linear", seed=2)
    config = json.loads((every / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(config["target_parameters"]) == {"gate.weight", "gate_up_proj", "down_proj"}
    with pytest.raises(AdapterFormatError) as err:
        load_weights(every, served(folder))
    assert err.value.field == "target_parameters"


@pytest.mark.parametrize("family", ALL)
def test_prompt_tuning_equals_peft_forward(family, family_dirs, tmp_path):
    folder = family_dirs(family)
    bm = served(folder)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(hf_model(folder), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        model.save_pretrained(tmp_path)
    ref = peft_reference(folder, tmp_path)
    soft = load_weights(tmp_path, bm)[1]
    expected = [reference_greedy(ref, p) for p in PROMPTS]
    for prefix_cache in (False, True):
        tokens, logits = greedy(bm, PROMPTS, soft=soft, prefix_cache=prefix_cache)
        for i, (want_tokens, want_logits) in enumerate(expected):
            assert tokens[i] == want_tokens
            assert close(logits[i], want_logits)


@pytest.mark.parametrize("family", [f for f in ALL if f not in RESIDUAL_POINTS])
def test_bottleneck_refused_where_adapterhub_has_no_residual_points(family, family_dirs):
    bm = served(family_dirs(family))
    with pytest.raises(AdapterFormatError) as err:
        load_bottleneck(FIXTURES / "adapterhub" / "tiny-llama" / "seq_bn-rf16", bm)
    assert err.value.field == "model_type" and family in str(err.value) and "llama" in str(err.value)


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "bert"}, "encoder-only"),
    ({"model_type": "t5"}, "encoder-decoder"),
    ({"model_type": "gemma3"}, "multimodal"),
    ({"model_type": "llava"}, "multimodal"),
])
def test_unsupported_architectures_refused_at_start_up(config, reason, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_base_model(tmp_path, device="cpu")
    message = str(err.value)
    assert reason in message and config["model_type"] in message and all(f in message for f in FAMILIES)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3_moe"])
def test_engine_serves_the_family(family, family_dirs, tmp_path):
    """The whole server: a batch of requests through the engine == transformers' generate."""
    folder = family_dirs(family)
    ref = hf_model(folder)
    with live_server(tmp_path, model=folder, examples=False) as srv:
        for prompt in PROMPTS:
            with torch.inference_mode():
                want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(prompt):].tolist()
            assert srv.generate(prompt_token_ids=prompt, max_new_tokens=8, ignore_eos=True)["token_ids"] == want
