"""Every adapter kind served over HTTP reproduces its reference library, alone and in mixed batches."""
from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors.torch
import torch

from server import kernels
from tests.adapters.conftest import GENERATED, make_adapter, peft_model
from tests.conftest import FIXTURES, GPT2, LLAMA, live_server, references

PEFT_LLAMA = FIXTURES / "peft" / "tiny-llama"
HUB_LLAMA = FIXTURES / "adapterhub" / "tiny-llama"
PEFT_GPT2 = FIXTURES / "peft" / "tiny-gpt2"
HUB_GPT2 = FIXTURES / "adapterhub" / "tiny-gpt2"
SERVED_GENERATED = ["dora", "rslora-r4", "patterns", "r1", "lora-bias", "layers", "head"]
UNMERGEABLE = {"lora-bias"}  # lora_B bias on a base layer without bias: PEFT cannot merge it either
NARROW = "bf16-saved"  # a LoRA saved in bfloat16: the CPU slot kernel reads its A and B at half width


def _expected(kind_dir: str, base: str) -> dict[str, list[list[int]]]:
    ref = references(kind_dir, base)
    return {name: a["outputs"] for name, a in ref["adapters"].items()}


def _peft_greedy(base: str, folder, prompts: list[list[int]], n: int) -> list[list[int]]:
    """PEFT's forward, re-run over the whole sequence for each new token (no cache), like references.json."""
    model = peft_model(base, folder)
    outs = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt in prompts:
            seq = list(prompt)
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(prompt):])
    return outs


@pytest.fixture(scope="module")
def llama_cases(tmp_path_factory) -> dict:
    """name -> (folder, expected outputs per reference prompt)."""
    ref = references("peft", "tiny-llama")
    cases = {}
    for name, outputs in _expected("peft", "tiny-llama").items():
        cases[name] = (PEFT_LLAMA / name, outputs)
    for name, outputs in _expected("adapterhub", "tiny-llama").items():
        cases[name] = (HUB_LLAMA / name, outputs)
    root = tmp_path_factory.mktemp("generated")
    for seed, name in enumerate(SERVED_GENERATED):
        base, config = GENERATED[name]
        folder = make_adapter(root / name, base, 100 + seed, **config)
        cases[name] = (folder, _peft_greedy("llama", folder, ref["prompts"], ref["new_tokens"]))
    base, config = GENERATED["qkvo-mlp-r8"]
    folder = _saved_in_bfloat16(make_adapter(root / NARROW, base, 200, **config))
    cases[NARROW] = (folder, _peft_greedy("llama", folder, ref["prompts"], ref["new_tokens"]))
    return cases


def _saved_in_bfloat16(folder):
    """The adapter's tensors rewritten in bfloat16, as PEFT saves a LoRA trained in it."""
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: t.to(torch.bfloat16) for k, t in tensors.items()}, path)
    return folder


@pytest.fixture(scope="module")
def llama_srv(tmp_path_factory, llama_cases):
    flags = [f"{name}={folder}" for name, (folder, _) in llama_cases.items()]
    with live_server(tmp_path_factory.mktemp("srv"), model=LLAMA, adapter=flags) as srv:
        hf = srv.app.state.base.hf
        srv.pristine = {name: p.detach().clone() for name, p in hf.named_parameters()}
        yield srv


def _is_lora(folder) -> bool:
    config = folder / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") == "LORA"


def _jobs(cases: dict, prompts: list[list[int]]) -> list[tuple[str | None, str | None, list[int], list[int]]]:
    """(adapter, mode, prompt, expected) for every adapter, LoRA in both modes."""
    jobs = []
    for name, (folder, outputs) in cases.items():
        modes = ["unmerged"] if name in UNMERGEABLE else ["unmerged", "merged"]
        for mode in modes if _is_lora(folder) else [None]:
            jobs += [(name, mode, p, o) for p, o in zip(prompts, outputs)]
    return jobs


def _run(srv, job) -> list[int]:
    name, mode, prompt, _ = job
    body = {"prompt_token_ids": prompt, "max_new_tokens": 12, "ignore_eos": True}
    if mode:
        body["mode"] = mode
    out = srv.generate(name, **body)
    assert out["adapter"] == name
    if mode:
        assert out["kind"] == "lora" and out["mode"] == mode
    return out["token_ids"]


def test_each_adapter_alone_matches_reference(llama_srv, llama_cases):
    prompts = references("peft", "tiny-llama")["prompts"]
    for job in _jobs(llama_cases, prompts):
        assert _run(llama_srv, job) == job[3], job[:2]


@pytest.mark.skipif(kernels.cpu() is None, reason="no C++ compiler here: no slot kernel to read the copies")
def test_a_lora_saved_in_bfloat16_is_read_at_half_width(llama_srv):
    """Its outputs are PEFT's (the tests around); here: the slot kernel reads its bfloat16 copies."""
    llama_srv.generate(NARROW, prompt_token_ids=[5, 6], max_new_tokens=2)
    lora = llama_srv.app.state.registry.get(NARROW).adapter.parts.lora
    assert lora.modules and all(w.narrow_A is not None and w.cpu_entry[5] == 1 for w in lora.modules.values())


def test_all_kinds_mixed_concurrently(llama_srv, llama_cases):
    """Base rows, unmerged and merged LoRA, soft prompts and bottlenecks all at once == alone."""
    ref = references("peft", "tiny-llama")
    jobs = _jobs(llama_cases, ref["prompts"])
    jobs += [(None, None, p, o) for p, o in zip(ref["prompts"], ref["base_outputs"])] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _run(llama_srv, j) if j[0] else llama_srv.generate(
            prompt_token_ids=j[2], max_new_tokens=12, ignore_eos=True)["token_ids"], jobs))
    assert results == [j[3] for j in jobs]


def test_base_weights_bit_identical_after_merges(llama_srv, llama_cases):
    for _ in range(3):
        for name in ("lora-qv-r8", "dora", "lora-all-r16"):
            llama_srv.generate(name, prompt_token_ids=[5, 6], max_new_tokens=2, mode="merged")
            llama_srv.generate(None, prompt_token_ids=[5, 6], max_new_tokens=2)
    hf = llama_srv.app.state.base.hf
    for name, p in hf.named_parameters():
        key = name.replace(".base_layer", "")
        assert torch.equal(p, llama_srv.pristine.get(key, llama_srv.pristine.get(name))), name


def test_unmergeable_adapter_refused_merged(llama_srv):
    with llama_srv.client() as c:
        r = c.post("/generate", params={"adapter": "lora-bias"}, json={"prompt": "x", "mode": "merged"})
    assert r.status_code == 422
    assert "lora_bias" in r.json()["error"]["message"]
    assert llama_srv.generate("lora-bias", prompt_token_ids=[5], max_new_tokens=2)["mode"] == "unmerged"


def test_default_mode_and_mode_errors(llama_srv):
    out = llama_srv.generate("lora-qv-r8", prompt_token_ids=[5, 6], max_new_tokens=2)
    assert out["mode"] == "unmerged"
    with llama_srv.client() as c:
        r = c.post("/generate", params={"adapter": "prompt-16"}, json={"prompt": "x", "mode": "merged"})
    assert r.status_code == 400 and "LoRA" in r.json()["error"]["message"]


def test_soft_prompt_prefix_computed_once_and_cache_off_agrees(llama_srv, tmp_path, monkeypatch):
    from server.engine import prefill

    computed = []
    original = prefill.PrefixKV

    def counting(*args):
        computed.append(1)
        return original(*args)

    monkeypatch.setattr(prefill, "PrefixKV", counting)
    ref = references("peft", "tiny-llama")
    expected = ref["adapters"]["prompt-16"]["outputs"]
    with live_server(tmp_path / "on", model=LLAMA, adapter=[f"soft={PEFT_LLAMA / 'prompt-16'}"]) as on, \
            live_server(tmp_path / "off", model=LLAMA, prefix_cache=False,
                        adapter=[f"soft={PEFT_LLAMA / 'prompt-16'}"]) as off:
        for _ in range(3):
            for prompt, want in zip(ref["prompts"], expected):
                body = {"prompt_token_ids": prompt, "max_new_tokens": 12, "ignore_eos": True}
                assert on.generate("soft", **body)["token_ids"] == want
                assert off.generate("soft", **body)["token_ids"] == want
    assert len(computed) == 1  # once per adapter, for 9 requests; never with the cache off


@pytest.fixture(scope="module")
def gpt2_srv(tmp_path_factory):
    flags = [f"{n}={PEFT_GPT2 / n}" for n in _expected("peft", "tiny-gpt2")]
    flags += [f"{n}={HUB_GPT2 / n}" for n in _expected("adapterhub", "tiny-gpt2")]
    with live_server(tmp_path_factory.mktemp("gpt2"), model=GPT2, adapter=flags) as srv:
        yield srv


def test_gpt2_adapters_match_references(gpt2_srv):
    prompts = references("peft", "tiny-gpt2")["prompts"]
    cases = {n: (PEFT_GPT2 / n, o) for n, o in _expected("peft", "tiny-gpt2").items()}
    cases |= {n: (HUB_GPT2 / n, o) for n, o in _expected("adapterhub", "tiny-gpt2").items()}
    jobs = _jobs(cases, prompts)
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _run(gpt2_srv, j), jobs))
    assert results == [j[3] for j in jobs]
