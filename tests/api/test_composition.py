"""Several adapters in one request and activated LoRA, served over HTTP == the reference libraries.

References: PEFT's `add_weighted_adapter(..., combination_type="cat")` for weighted LoRAs; PEFT's
prompt tuning on a base copy with the LoRA merged into it; AdapterHub on such a copy
(tests/fixtures/compose/references.json, made by make_references.py beside it); PEFT's own
`generate` for aLoRA. Each alone, merged where allowed, and all at once in shared batches.
"""
from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel

from tests.adapters.conftest import load_base, make_adapter, one_thread  # noqa: F401 - autouse: tiny matmuls
from tests.conftest import FIXTURES, LLAMA, live_server, references

PEFT_LLAMA = FIXTURES / "peft" / "tiny-llama"
HUB_LLAMA = FIXTURES / "adapterhub" / "tiny-llama"
COMPOSED = json.loads((FIXTURES / "compose" / "references.json").read_text())
INVOCATION = [1000, 2000, 3000]
ALORA_PROMPTS = {  # what the prompt holds of the invocation -> the prompt
    "middle": [5, 17, *INVOCATION, 301, 42, 999],
    "twice": [*INVOCATION, 77, 77, *INVOCATION, 12],
    "partial": [5, 17, 1000, 2000, 301, 42, 1000],
    "none": [5, 17, 301, 42, 999, 7, 12],
}
NEW = 12


@torch.inference_mode()
def _greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """The reference library's forward re-run over the whole sequence for each new token (no cache)."""
    outs = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(NEW):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        outs.append(seq[len(prompt):])
    return outs


def _peft(loras: dict[str, float]) -> PeftModel:
    """The LoRAs on a fresh base; several (or one weighted) combined as PEFT's "cat" adapter."""
    names = list(loras)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base("llama"), PEFT_LLAMA / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(PEFT_LLAMA / name, adapter_name=name)
        if len(names) > 1 or loras[names[0]] != 1.0:
            model.add_weighted_adapter(names, list(loras.values()), "combined", combination_type="cat")
            model.set_adapter("combined")
    return model.eval()


def _with_prompt(loras: dict[str, float]) -> PeftModel:
    """PEFT's prompt tuning on a base copy with the LoRAs merged into it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_peft(loras).merge_and_unload(), PEFT_LLAMA / "prompt-16").eval()


@torch.inference_mode()
def _alora_generate(folder, prompts: list[list[int]]) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base("llama")
        base.generation_config.eos_token_id = None  # as the server's ignore_eos: never stop early
        model = PeftModel.from_pretrained(base, folder).eval()
        return [model.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
                for p in prompts]


def _entries(loras: dict[str, float], *whole: str) -> list[dict]:
    return [{"name": n, "weight": w} for n, w in loras.items()] + [{"name": n} for n in whole]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """name -> (adapters list, modes, prompts, expected outputs)."""
    prompts = COMPOSED["prompts"]
    alora = make_adapter(tmp_path_factory.mktemp("alora") / "alora", "llama", 7, r=4, lora_alpha=16,
                         target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=INVOCATION,
                         task_type="CAUSAL_LM")
    both = ("unmerged", "merged")
    out = {"alora": (alora, [{"name": "alora"}], ("unmerged",), list(ALORA_PROMPTS.values()),
                     _alora_generate(alora, list(ALORA_PROMPTS.values())))}
    for loras in ({"lora-qv-r8": 0.7, "lora-all-r16": 0.3}, {"lora-qv-r8": 1.0, "lora-all-r16": 1.0}):
        label = "+".join(f"{n}*{w:g}" for n, w in loras.items())
        out[label] = (None, _entries(loras), both, prompts, _greedy(_peft(loras), prompts))
    for loras in ({"lora-qv-r8": 1.0}, {"lora-qv-r8": 0.7, "lora-all-r16": 0.3}):
        out[f"{list(loras)}+prompt-16"] = (None, _entries(loras, "prompt-16"), both, prompts,
                                           _greedy(_with_prompt(loras), prompts))
    for name, case in COMPOSED["cases"].items():
        whole = [w for w in (case["prompt"], case["bottleneck"]) if w]
        out[name] = (None, _entries(case["loras"], *whole), both, COMPOSED["prompts"], case["outputs"])
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cases):
    folders = {n: PEFT_LLAMA / n for n in ("lora-qv-r8", "lora-all-r16", "prompt-16")}
    folders |= {n: HUB_LLAMA / n for n in ("seq_bn-rf16", "double_seq_bn-rf8")}
    folders["alora"] = cases["alora"][0]
    flags = [f"{name}={folder}" for name, folder in folders.items()]
    with live_server(tmp_path_factory.mktemp("srv"), model=LLAMA, adapter=flags) as server:
        hf = server.app.state.base.hf
        server.folders = folders
        server.pristine = {name: p.detach().clone() for name, p in hf.named_parameters()}
        yield server


def _jobs(cases: dict) -> list[tuple[dict, list[int]]]:
    """(request body, expected tokens) for every case in each of its modes."""
    jobs = []
    for _, entries, modes, prompts, outputs in cases.values():
        for mode in modes:
            for prompt, expected in zip(prompts, outputs):
                body = {"adapters": entries, "prompt_token_ids": prompt, "max_new_tokens": NEW, "ignore_eos": True,
                        "mode": mode}
                jobs.append((body, expected))
    return jobs


def _tokens(srv, body: dict, adapter: str | None = None) -> list[int]:
    return srv.generate(adapter, **body)["token_ids"]


def test_each_composition_alone_matches_reference(srv, cases):
    for body, expected in _jobs(cases):
        assert _tokens(srv, body) == expected, (body["adapters"], body["mode"], body["prompt_token_ids"])


def test_alora_is_the_base_model_without_a_full_invocation(srv, cases):
    base = [_tokens(srv, {"prompt_token_ids": p, "max_new_tokens": NEW, "ignore_eos": True})
            for p in ALORA_PROMPTS.values()]
    _, _, _, _, outputs = cases["alora"]
    names = list(ALORA_PROMPTS)
    assert outputs[names.index("partial")] == base[names.index("partial")]
    assert outputs[names.index("none")] == base[names.index("none")]
    assert outputs[names.index("middle")] != base[names.index("middle")]  # the adapter does something there
    served = [_tokens(srv, {"prompt_token_ids": p, "max_new_tokens": NEW, "ignore_eos": True}, "alora")
              for p in ALORA_PROMPTS.values()]
    assert served == outputs  # named alone as ?adapter=, as in the list


def test_all_mixed_in_shared_batches(srv, cases):
    """Compositions, plain adapters and base rows at once: each gets what it gets alone."""
    ref = references("peft", "tiny-llama")
    jobs = [(None, b, e) for b, e in _jobs(cases)]
    for name in ("lora-qv-r8", "prompt-16"):
        jobs += [(name, {"prompt_token_ids": p, "max_new_tokens": NEW, "ignore_eos": True}, o)
                 for p, o in zip(ref["prompts"], ref["adapters"][name]["outputs"])]
    jobs += [(None, {"prompt_token_ids": p, "max_new_tokens": NEW, "ignore_eos": True}, o)
             for p, o in zip(ref["prompts"], ref["base_outputs"])] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _tokens(srv, job[1], job[0]), jobs))
    assert results == [e for _, _, e in jobs]


def test_merged_compositions_restore_the_base_bit_for_bit(srv):
    body = {"adapters": [{"name": "lora-qv-r8", "weight": 0.5}, {"name": "lora-all-r16"}],
            "prompt_token_ids": [5, 6], "max_new_tokens": 2, "mode": "merged"}
    for _ in range(2):
        srv.generate(**body)
        srv.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
    for name, p in srv.app.state.base.hf.named_parameters():
        key = name.replace(".base_layer", "")
        assert torch.equal(p, srv.pristine.get(key, srv.pristine.get(name))), name


def test_response_and_metrics_name_the_combination(srv):
    out = srv.generate(adapters=[{"name": "prompt-16"}, {"name": "lora-qv-r8", "weight": 0.7},
                                 {"name": "lora-all-r16", "weight": 0.3}], prompt_token_ids=[5], max_new_tokens=2)
    assert (out["adapter"], out["kind"], out["mode"]) == ("lora-all-r16*0.3+lora-qv-r8*0.7+prompt-16",
                                                          "lora+prompt", "unmerged")
    with srv.client() as c:
        metrics = c.get("/metrics").text
    assert 'hotswap_requests_total{kind="lora+prompt",mode="unmerged",status="ok"}' in metrics


def test_the_references_tell_the_combinations_apart(cases):
    firsts = {name: tuple(map(tuple, case[4])) for name, case in cases.items()}
    assert len(set(firsts.values())) == len(firsts)


def test_chunked_prefill_without_the_prefix_cache_agrees(tmp_path, srv, cases):
    """Prompts fed 4 tokens a step (invocations cut across chunks), virtual tokens in the row."""
    flags = [f"{name}={folder}" for name, folder in srv.folders.items()]
    with live_server(tmp_path, model=LLAMA, adapter=flags, prefix_cache=False, prefill_chunk_tokens=4) as chunked:
        jobs = _jobs(cases)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: _tokens(chunked, job[0]), jobs))
    assert results == [e for _, e in jobs]
