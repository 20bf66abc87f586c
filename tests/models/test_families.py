"""Every supported family through the model's own transformers code over our cache: greedy == generate,
batch == rows alone, PEFT LoRA (attention, all-linear; unmerged, merged, mixed) and prompt tuning == PEFT."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from server.adapters import lora_layer
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


def make_lora(base_folder: Path, folder: Path, family: str, targets, seed: int, r: int = 4) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
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
    paths = {"attn": make_lora(folder, tmp_path / "attn", family, attention_targets(family), seed=1),
             "all": make_lora(folder, tmp_path / "all", family, "all-linear", seed=2)}
    adapters = {name: load_weights(path, bm)[1] for name, path in paths.items()}
    expected = {name: [reference_greedy(peft_reference(folder, path), p) for p in PROMPTS] for name, path in paths.items()}
    base = [reference_greedy(hf_model(folder), p) for p in PROMPTS]

    rows = [("attn", 0), (None, 1), ("all", 2), ("all", 0), ("attn", 2)]  # mixed, unmerged
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
def test_moe_all_linear_serves_router_and_experts_as_peft(family, family_dirs, tmp_path):
    """PEFT 0.21.2 on transformers 5: "all-linear" on an MoE base is the q/k/v/o modules plus
    `target_parameters` (the router's weight and the fused experts' gate_up_proj and down_proj). Served
    unmerged (one adapter on every row; two of them, ranks 4 and 2, with a base row in one batch) and
    merged == PEFT; merged == unmerged; the base bit-exact after merge and restore."""
    folder = family_dirs(family)
    bm = served(folder)
    paths = [make_lora(folder, tmp_path / f"all{r}", family, "all-linear", seed=r, r=r) for r in (4, 2)]
    config = json.loads((paths[0] / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(config["target_parameters"]) == {"gate.weight", "gate_up_proj", "down_proj"}
    adapters = [load_weights(path, bm)[1] for path in paths]
    assert sorted(adapters[0].experts["model.layers.0.mlp.experts"]) == ["down_proj", "gate_up_proj"]
    expected = [[reference_greedy(peft_reference(folder, path), p) for p in PROMPTS] for path in paths]
    base = [reference_greedy(hf_model(folder), p) for p in PROMPTS]
    pristine = {k: v.clone() for k, v in bm.hf.state_dict().items()}

    unmerged = greedy(bm, PROMPTS, [adapters[0]] * len(PROMPTS))
    rows = [(1, 0), (None, 1), (0, 2), (1, 2), (0, 1)]  # adapter (None: base), prompt
    tokens, logits = greedy(bm, [PROMPTS[p] for _, p in rows], [None if a is None else adapters[a] for a, _ in rows])
    state = merge(bm.hf, adapters[0])
    try:
        merged = greedy(bm, PROMPTS)
    finally:
        state.restore()

    for i, (a, p) in enumerate(rows):
        want_tokens, want_logits = (base if a is None else expected[a])[p]
        assert tokens[i] == want_tokens and close(logits[i], want_logits)
    for i, (want_tokens, want_logits) in enumerate(expected[0]):
        assert unmerged[0][i] == merged[0][i] == want_tokens
        assert close(unmerged[1][i], want_logits) and close(merged[1][i], want_logits)
        assert close(merged[1][i], unmerged[1][i])
    after = bm.hf.state_dict()
    assert after.keys() == pristine.keys() and all(torch.equal(after[k], v) for k, v in pristine.items())


# PEFT's file keys: mlp.gate (router), mlp.experts.base_layer (gate_up_proj), mlp.experts (down_proj)
MLP = "base_model.model.model.layers.0.mlp"


@pytest.fixture(scope="module")
def qwen3_moe_all_linear(family_dirs, tmp_path_factory) -> Path:
    return make_lora(family_dirs("qwen3_moe"), tmp_path_factory.mktemp("moe") / "all", "qwen3_moe", "all-linear", 2)


def test_moe_merge_raising_part_way_rolls_back_bit_exactly(qwen3_moe_all_linear, family_dirs, monkeypatch):
    bm = served(family_dirs("qwen3_moe"))
    lora = load_weights(qwen3_moe_all_linear, bm)[1]
    before = {k: v.clone() for k, v in bm.hf.state_dict().items()}
    real, calls = lora_layer.merge_experts, []

    def merge_experts(experts, weights, saved):
        real(experts, weights, saved)  # the second layer's experts changed, then out of memory
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(lora_layer, "merge_experts", merge_experts)
    with pytest.raises(RuntimeError):
        merge(bm.hf, lora)
    after = bm.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    merge(bm.hf, lora).restore()  # no merge was left registered


@pytest.mark.parametrize("config, tensors, field", [
    ({}, {f"{MLP}.experts.base_layer.lora_A.weight": torch.zeros(33, 64)}, f"{MLP}.experts.base_layer.lora_A.weight"),
    ({}, {f"{MLP}.experts.lora_B.weight": None}, f"{MLP}.experts.lora_B.weight"),
    ({}, {f"{MLP}.gate.lora_B.weight": torch.zeros(5, 4)}, f"{MLP}.gate.lora_B.weight"),
    ({}, {f"{MLP}.experts.lora_B.bias": torch.zeros(64)}, f"{MLP}.experts.lora_B.bias"),
    ({}, {f"{MLP}.experts.base_layer.base_layer.lora_A.weight": torch.zeros(4, 64)},
     f"{MLP}.experts.base_layer.base_layer.lora_A.weight"),
    ({"rank_pattern": {}}, {}, f"{MLP}.experts.base_layer.lora_A.weight"),  # gate_up_proj is saved at rank 2r
    ({"target_parameters": ["gate.weight", "gate_up_proj", "down_proj", "shared_expert.weight"]}, {},
     "target_parameters"),  # no such parameter
    ({"target_parameters": ["gate.weight", "gate_up_proj", "down_proj", "input_layernorm.weight"]}, {},
     "target_parameters"),  # a norm's weight: not a router's or the experts'
    ({"target_parameters": ["gate.weight", "gate_up_proj", "down_proj", "q_proj.weight"]}, {},
     "target_parameters"),  # q_proj is in target_modules too
    ({"target_parameters": "gate_up_proj"}, {}, "target_parameters"),
    ({"use_dora": True}, {}, "use_dora"),
])
def test_moe_parameter_lora_refusals_name_the_field(config, tensors, field, qwen3_moe_all_linear, family_dirs,
                                                    tmp_path):
    folder = shutil.copytree(qwen3_moe_all_linear, tmp_path / "edited")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    weights = load_file(folder / "adapter_model.safetensors")
    for key, tensor in tensors.items():
        if tensor is None:
            del weights[key]
        else:
            weights[key] = tensor
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError) as err:
        load_weights(folder, served(family_dirs("qwen3_moe")))
    assert err.value.field == field and err.value.status == 422


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


def test_engine_serves_a_moe_all_linear_lora(qwen3_moe_all_linear, family_dirs, tmp_path):
    """The whole server, unmerged and merged: router and expert LoRA through the engine == PEFT."""
    folder = family_dirs("qwen3_moe")
    ref = peft_reference(folder, qwen3_moe_all_linear)
    with live_server(tmp_path, model=folder, examples=False, adapter=[f"moe={qwen3_moe_all_linear}"]) as srv:
        for prompt in PROMPTS:
            want = reference_greedy(ref, prompt, new=8)[0]
            for mode in ("unmerged", "merged"):
                out = srv.generate("moe", prompt_token_ids=prompt, max_new_tokens=8, ignore_eos=True, mode=mode)
                assert out["token_ids"] == want, mode
