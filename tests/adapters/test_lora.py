"""PEFT LoRA: served logits == PEFT's, mixed batch == each row alone, merged == unmerged,
restore == pristine base, and every refusal names its field or key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.lora import (
    LoraContext,
    LoraPlan,
    MergeConflictError,
    ensure_wrapped,
    load_lora,
    merge,
    parse_lora_config,
)
from server.errors import AdapterFormatError
from tests.adapters.conftest import (
    FIXTURE_ADAPTERS,
    FIXTURES,
    GENERATED,
    load_base,
    make_adapter,
    peft_model,
)

REFS = {base: json.loads((FIXTURES / "peft" / f"tiny-{base}" / "references.json").read_text())
        for base in ("llama", "gpt2")}
FIXTURE_NAMES = {"qv-r8": "lora-qv-r8", "all-r16": "lora-all-r16", "cattn-r8": "lora-cattn-r8"}


class Served:
    """A base model with our wrappers, run through its own HF forward (no KV cache)."""

    def __init__(self, base: str) -> None:
        self.model = load_base(base)
        self.ctx = LoraContext()

    def load(self, folder: Path):
        adapter = load_lora(folder, self.model)
        ensure_wrapped(self.model, adapter.modules, self.ctx)
        return adapter

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, rows: list) -> torch.Tensor:
        self.ctx.plan = LoraPlan.build(rows)  # ids: [N, T] -> logits [N, T, V]
        return self.model(input_ids=ids, use_cache=False).logits


@torch.inference_mode()
def greedy(forward, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(forward(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_ids(base: str, rows: int, length: int = 6) -> torch.Tensor:
    return torch.randint(2, 4096, (rows, length), generator=torch.Generator().manual_seed(rows))



@pytest.fixture(scope="module")
def served() -> dict[str, Served]:
    return {"llama": Served("llama"), "gpt2": Served("gpt2")}


# ---------------------------------------------------------------- fidelity to PEFT


@pytest.mark.parametrize("name", list(FIXTURE_ADAPTERS))
def test_fixture_matches_peft_and_references(name, served):
    base, folder = FIXTURE_ADAPTERS[name]
    ours = served[base]
    adapter = ours.load(folder)
    ref = peft_model(base, folder)
    refs = REFS[base]
    for i, prompt in enumerate(refs["prompts"]):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            expected = ref(input_ids=ids).logits
        assert (ours.logits(ids, [adapter]) - expected).abs().max() < 1e-5
        got = greedy(lambda x: ours.logits(x, [adapter]), prompt, refs["new_tokens"])
        assert got == refs["adapters"][FIXTURE_NAMES[name]]["outputs"][i]


@pytest.mark.parametrize("name", list(GENERATED))
def test_generated_matches_peft(name, adapter_dirs, served):
    base, folder = adapter_dirs[name]
    ours = served[base]
    adapter = ours.load(folder)
    ids = random_ids(base, 2)
    with torch.inference_mode():
        expected = peft_model(base, folder)(input_ids=ids).logits
    got = ours.logits(ids, [adapter, adapter])
    assert (got - expected).abs().max() < 1e-5
    assert (got - ours.logits(ids, [None, None])).abs().max() > 1e-2  # the adapter does something


def test_plan_none_is_the_base_model(served):
    ours = served["llama"]
    ours.load(FIXTURE_ADAPTERS["all-r16"][1])
    ids = random_ids("llama", 2)
    with torch.inference_mode():
        expected = load_base("llama")(input_ids=ids).logits
    assert torch.equal(ours.logits(ids, [None, None]), expected)


def test_spec_resolves_patterns_and_layers(adapter_dirs, served):
    patterns = served["llama"].load(adapter_dirs["patterns"][1])
    q = patterns.modules["model.layers.0.self_attn.q_proj"]
    v1, v2 = (patterns.modules[f"model.layers.{i}.self_attn.v_proj"] for i in (1, 2))
    assert (q.rank, q.scale) == (2, 4.0) and (v1.rank, v1.scale) == (6, 0.5) and (v2.rank, v2.scale) == (4, 0.75)
    assert patterns.modules["model.layers.3.self_attn.o_proj"].scale == 8.0
    layers = served["llama"].load(adapter_dirs["layers"][1])
    expected = [f"model.layers.{i}.{m}" for i in (1, 3) for m in ("mlp.up_proj", "self_attn.q_proj")]
    assert sorted(layers.modules) == expected
    all_linear = served["gpt2"].load(adapter_dirs["gpt2-all-linear"][1])
    assert len(all_linear.modules) == 12 and not any("c_fc" in n for n in all_linear.modules)


def test_to_and_size_bytes(adapter_dirs, served):
    adapter = served["gpt2"].load(adapter_dirs["gpt2-dora"][1])
    assert all(w.dora_scale is not None and w.base_bias is not None for w in adapter.modules.values())
    half = adapter.to("cpu", torch.bfloat16)
    assert half.size_bytes * 2 == adapter.size_bytes
    assert all(t.dtype == torch.bfloat16 for w in half.modules.values() for t in w.tensors())


# ---------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("base,row_names", [
    ("llama", [None, "qv-r8", "all-r16", "dora", None, "patterns", "r1", "qv-r8", "lora-bias"]),
    ("gpt2", [None, "gpt2-dora", "cattn-r8", "gpt2-bias", "gpt2-dora", "gpt2-all-linear"]),
])
def test_mixed_batch_equals_each_row_alone(base, row_names, adapter_dirs, served):
    ours = served[base]
    adapters = {n: ours.load(adapter_dirs[n][1]) for n in set(row_names) - {None}}
    rows = [None if n is None else adapters[n] for n in row_names]
    ids = random_ids(base, len(rows))
    mixed = ours.logits(ids, rows)
    for i, row in enumerate(rows):
        alone = ours.logits(ids[i:i + 1], [row])
        assert (mixed[i] - alone[0]).abs().max() < 1e-5, row_names[i]
        assert torch.equal(mixed[i].argmax(-1), alone[0].argmax(-1)), row_names[i]


# ---------------------------------------------------------------- merged


@pytest.mark.parametrize("name", ["qv-r8", "all-r16", "cattn-r8", *[n for n in GENERATED if n != "lora-bias"]])
def test_merged_equals_unmerged(name, adapter_dirs, served):
    base, folder = adapter_dirs[name]
    ours = served[base]
    adapter = ours.load(folder)
    ids = random_ids(base, 2)
    unmerged = ours.logits(ids, [adapter, adapter])
    state = merge(ours.model, adapter)
    try:
        merged = ours.logits(ids, [None, None])
    finally:
        state.restore()
    assert (merged - unmerged).abs().max() < 1e-4


def test_thousand_merge_restore_cycles_are_bit_exact(tmp_path):
    model = load_base("gpt2")
    small = {"r": 2, "fan_in_fan_out": True, "layers_to_transform": [0]}  # weights, biases, DoRA: 3 modules
    adapters = [load_lora(make_adapter(tmp_path / "bias", "gpt2", 1, lora_bias=True, bias="lora_only",
                                       target_modules=["c_attn", "c_fc"], **small), model),
                load_lora(make_adapter(tmp_path / "dora", "gpt2", 2, use_dora=True, target_modules=["c_proj"],
                                       **small), model)]
    ensure_wrapped(model, [n for a in adapters for n in a.modules], LoraContext())
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(1000):
        merge(model, adapters[i % 2]).restore()
    after = model.state_dict()
    assert after.keys() == pristine.keys()
    assert all(torch.equal(after[k], v) for k, v in pristine.items())


def test_merge_refusals(adapter_dirs, served):
    ours = served["llama"]
    plain, dora, biased = (ours.load(adapter_dirs[n][1]) for n in ("qv-r8", "dora", "lora-bias"))
    with pytest.raises(AdapterFormatError) as e:
        merge(ours.model, biased)  # lora_bias on a layer without bias (PEFT cannot merge it either)
    assert e.value.field == "lora_bias"
    state = merge(ours.model, plain)
    with pytest.raises(MergeConflictError):
        merge(ours.model, plain)
    reloaded = load_lora(adapter_dirs["dora"][1], ours.model)  # DoRA norms come from the pristine base
    state.restore()
    with pytest.raises(MergeConflictError):
        state.restore()
    assert all(torch.equal(reloaded.modules[n].dora_scale, w.dora_scale) for n, w in dora.modules.items())


def test_merge_refuses_a_tied_weight(tmp_path):
    model = load_base("gpt2")  # lm_head shares its weight with the token embedding
    folder = write_adapter(tmp_path, {"target_modules": ["lm_head"]}, {
        "base_model.model.lm_head.lora_A.weight": torch.randn(8, 256),
        "base_model.model.lm_head.lora_B.weight": torch.randn(4096, 8),
    })
    adapter = load_lora(folder, model)
    with pytest.raises(AdapterFormatError) as e:
        merge(model, adapter)
    assert e.value.field == "lm_head"


# ---------------------------------------------------------------- refusals


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base_config = json.loads((FIXTURE_ADAPTERS["qv-r8"][1] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**base_config, **config}))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def qv_with(tmp_path: Path, edit) -> Path:
    tensors = load_file(FIXTURE_ADAPTERS["qv-r8"][1] / "adapter_model.safetensors")
    edit(tensors)
    return write_adapter(tmp_path / "edited", {}, tensors)


QV = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("field,value", [
    ("peft_type", "PREFIX_TUNING"),
    ("modules_to_save", ["lm_head"]),
    ("trainable_token_indices", [1, 2]),
    ("layer_replication", [[0, 2]]),
    ("target_parameters", "mlp.experts.gate_up_proj"),  # a string: PEFT wants a list
    ("use_qalora", True),
    ("alora_invocation_tokens", ["5", 6]),
    ("alora_invocation_tokens", []),
    ("arrow_config", {"top_k": 2}),
    ("use_bdlora", {"lora_a_is_blockdiagonal": True}),
    ("kasa_config", {"beta": 1.0}),
    ("velora_config", {"rank": 2}),
    ("monteclora_config", {"num_samples": 2}),
    ("ensure_weight_tying", True),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
    ("some_future_field", {"on": True}),
    ("r", 0),
    ("lora_alpha", "16"),
    ("use_dora", "yes"),
    ("bias", "some"),
    ("target_modules", None),
    ("target_modules", "(unclosed"),
    ("rank_pattern", {"q_proj": -1}),
    ("layers_pattern", "layers"),
])
def test_refuses_config_field(field, value):
    config = json.loads((FIXTURE_ADAPTERS["qv-r8"][1] / "adapter_config.json").read_text())
    with pytest.raises(AdapterFormatError) as e:
        parse_lora_config({**config, field: value})
    assert e.value.field.startswith(field)


def test_refuses_invalid_combinations():
    config = json.loads((FIXTURE_ADAPTERS["qv-r8"][1] / "adapter_config.json").read_text())
    for extra, field in [({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
                         ({"use_dora": True, "lora_bias": True}, "lora_bias")]:
        with pytest.raises(AdapterFormatError) as e:
            parse_lora_config({**config, **extra})
        assert e.value.field == field


@pytest.mark.parametrize("edit,key", [
    (lambda t: t.update({f"{QV}.lora_A.weight": torch.zeros(8, 255)}), f"{QV}.lora_A.weight"),
    (lambda t: t.update({f"{QV}.lora_B.weight": torch.zeros(256, 4)}), f"{QV}.lora_B.weight"),
    (lambda t: t[f"{QV}.lora_B.weight"].__setitem__((3, 1), float("nan")), f"{QV}.lora_B.weight"),
    (lambda t: t[f"{QV}.lora_A.weight"].__setitem__((0, 0), float("inf")), f"{QV}.lora_A.weight"),
    (lambda t: t.pop(f"{QV}.lora_B.weight"), f"{QV}.lora_B.weight"),
    (lambda t: t.update({f"{QV}.lora_A.weight": torch.zeros(8, 256, dtype=torch.int32)}), f"{QV}.lora_A.weight"),
    (lambda t: t.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(8, 256)}),
     "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(8, 256)}),
     "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"),
    (lambda t: t.update({f"{QV}.lora_magnitude_vector": torch.ones(256)}), f"{QV}.lora_magnitude_vector"),
    (lambda t: t.update({f"{QV}.base_layer.bias": torch.ones(256)}), f"{QV}.base_layer.bias"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 256)}),
     "model.layers.0.self_attn.q_proj.lora_A.weight"),
])
def test_refuses_bad_tensor_naming_the_key(edit, key, tmp_path):
    folder = qv_with(tmp_path, edit)
    with pytest.raises(AdapterFormatError) as e:
        load_lora(folder, load_base("llama"))
    assert e.value.field == key and key in str(e.value)


def test_refuses_rank_that_disagrees_with_rank_pattern(tmp_path):
    folder = qv_with(tmp_path, lambda t: None)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"v_proj": 4}}))
    with pytest.raises(AdapterFormatError) as e:
        load_lora(folder, load_base("llama"))
    assert e.value.field == "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"


def test_untargeted_biases_only_if_unchanged(adapter_dirs, tmp_path):
    folder = tmp_path / "gpt2-bias"
    shutil.copytree(adapter_dirs["gpt2-bias"][1], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.1.ln_2.bias"
    assert key in tensors  # bias="all" saves every bias; unchanged ones load fine
    tensors[key] = tensors[key] + 1
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError) as e:
        load_lora(folder, load_base("gpt2"))
    assert e.value.field == key



def test_a_saved_head_weight_only_if_unchanged(adapter_dirs, tmp_path):
    folder = shutil.copytree(adapter_dirs["head"][1], tmp_path / "head")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in tensors  # PEFT's default when lm_head is a target; equal to the base's, it loads fine
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError) as e:
        load_lora(folder, load_base("llama"))
    assert e.value.field == key and "own base" in str(e.value)


def test_refuses_truncated_safetensors(tmp_path):
    folder = shutil.copytree(FIXTURE_ADAPTERS["qv-r8"][1], tmp_path / "cut")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError) as e:
        load_lora(folder, load_base("llama"))
    assert e.value.field == "adapter_model.safetensors"


def test_refuses_missing_or_broken_config(tmp_path):
    folder = shutil.copytree(FIXTURE_ADAPTERS["qv-r8"][1], tmp_path / "cfg")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError):
        load_lora(folder, load_base("llama"))
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError):
        load_lora(folder, load_base("llama"))


def bin_folder(tmp_path: Path, payload) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(FIXTURE_ADAPTERS["qv-r8"][1] / "adapter_config.json", folder)
    torch.save(payload, folder / "adapter_model.bin")
    return folder


def test_bin_state_dict_loads_like_safetensors(tmp_path):
    model = load_base("llama")
    tensors = load_file(FIXTURE_ADAPTERS["qv-r8"][1] / "adapter_model.safetensors")
    from_bin = load_lora(bin_folder(tmp_path, tensors), model)
    from_st = load_lora(FIXTURE_ADAPTERS["qv-r8"][1], model)
    assert all(torch.equal(from_bin.modules[n].B, w.B) for n, w in from_st.modules.items())


class CreatesFile:
    """Unpickling this would create a file (if the unpickler allowed arbitrary globals)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_with_pickled_object_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "created-by-pickle"
    folder = bin_folder(tmp_path, {f"{QV}.lora_A.weight": torch.zeros(8, 256), "payload": CreatesFile(marker)})
    with pytest.raises(AdapterFormatError) as e:
        load_lora(folder, load_base("llama"))
    assert e.value.field == "adapter_model.bin"
    assert not marker.exists()


def test_bin_with_non_tensor_values_is_refused(tmp_path):
    with pytest.raises(AdapterFormatError) as e:
        load_lora(bin_folder(tmp_path, {f"{QV}.lora_A.weight": 3}), load_base("llama"))
    assert e.value.field == f"{QV}.lora_A.weight"  # the offending key; the file is in `expected`
