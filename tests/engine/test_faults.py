"""Faults stay with their request: an exception or a non-finite value while admitting, prefilling,
decoding, sampling or merging one request ends that request with a typed error, and every other
request in the same batches gets exactly its solo reference output. Nothing hangs; `in_use`
returns to 0; the base weights stay bit-identical.

Faults are injected in-process (the server runs in a thread of this process) at the depth where
they happen for real: inside a layer of the forward pass (after earlier layers wrote the KV cache),
in the sampler, in the middle of a merge.
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters import lora_layer
from server.adapters.bottleneck import BottleneckAdapter
from server.adapters.bottleneck_layer import SiteSlots
from server.engine import engine as engine_module
from server.engine import sampling
from server.engine.engine import Engine
from tests.conftest import FIXTURES, LLAMA, live_server, references

PEFT = FIXTURES / "peft" / "tiny-llama"
HUB = FIXTURES / "adapterhub" / "tiny-llama"
REF = references("peft", "tiny-llama")
HUB_REF = references("adapterhub", "tiny-llama")
N_NEW = REF["new_tokens"]
WAIT_S = 60  # every request here answers well within this, or the test fails instead of hanging


def _victims() -> list[tuple[str | None, list[int], list[int]]]:
    """(adapter, prompt, expected greedy output) for every kind, from the reference libraries."""
    jobs = [(None, p, out) for p, out in zip(REF["prompts"], REF["base_outputs"])]
    for name in ("lora-qv-r8", "lora-all-r16", "prompt-16"):
        jobs += [(name, p, out) for p, out in zip(REF["prompts"], REF["adapters"][name]["outputs"])]
    jobs += [("seq_bn-rf16", p, out) for p, out in zip(HUB_REF["prompts"], HUB_REF["adapters"]["seq_bn-rf16"]["outputs"])]
    return jobs


def _overflowing_lora(root: Path) -> Path:
    """lora-all-r16 with finite but huge B: the activations overflow, the logits come out NaN."""
    folder = root / "overflow"
    shutil.copytree(PEFT / "lora-all-r16", folder)
    path = folder / "adapter_model.safetensors"
    tensors = {k: v * 3e37 if "lora_B" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)
    return folder


def _long_prompt(root: Path, n_virtual: int = 300) -> Path:
    """A soft prompt with more virtual tokens than the KV cache's initial capacity (256)."""
    folder = root / "long-prompt"
    folder.mkdir()
    config = json.loads((PEFT / "prompt-16" / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": n_virtual}))
    save_file({"prompt_embeddings": torch.randn(n_virtual, 256, generator=torch.Generator().manual_seed(0))},
              folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    flags = [f"{n}={PEFT / n}" for n in ("lora-qv-r8", "lora-all-r16", "prompt-16")]
    flags += [f"seq_bn-rf16={HUB / 'seq_bn-rf16'}", f"poison-bn={HUB / 'seq_bn-rf16'}",
              f"overflow={_overflowing_lora(root)}", f"long-prompt={_long_prompt(root)}"]
    with live_server(root, model=LLAMA, adapter=flags, max_batch_size=32) as server:
        yield server


def _post(srv, adapter: str | None, body: dict) -> httpx.Response:
    with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
        return c.post("/generate", params={"adapter": adapter} if adapter else {}, json=body)


def _greedy(prompt: list[int], **extra) -> dict:
    return {"prompt_token_ids": prompt, "max_new_tokens": N_NEW, "ignore_eos": True, **extra}


def _run_with_victims(srv, faulty: list[tuple[str | None, dict]]) -> list[httpx.Response]:
    """Send the faulty requests amid every victim, all at once; check the victims; return the faulty answers."""
    victims = _victims()
    jobs = [(a, _greedy(p)) for a, p, _ in victims] + faulty
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _post(srv, *job), jobs))
    for (adapter, prompt, want), r in zip(victims, answers):
        assert r.status_code == 200, (adapter, r.text)
        assert r.json()["token_ids"] == want, (adapter, prompt)
    _assert_released(srv)
    return answers[len(victims):]


def _assert_released(srv) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with srv.client() as c:
            held = {a["name"]: a["in_use"] for a in c.get("/adapters").json()["adapters"] if a["in_use"]}
        if not held:
            return
        time.sleep(0.05)
    raise AssertionError(f"adapters still in use after every request answered: {held}")


def _error(r: httpx.Response, status: int, type_: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == type_, r.text
    return r.json()["error"]["message"]


@pytest.fixture
def poisoned(monkeypatch, srv):
    """poisoned(stage): the poison-bn adapter's layers raise at prefill (L > 1) or decode (L == 1)."""
    def arm(stage: str) -> None:
        with srv.client() as c:
            assert c.post("/adapters/poison-bn/pin").status_code == 200  # resident: its weights object exists
        weights = srv.app.state.registry.get("poison-bn").adapter.weights
        by_group, by_slot = BottleneckAdapter.residual, SiteSlots.residual  # prefill; decode on the CPU

        def group_residual(self, site, h, x):
            if self is weights and (h.shape[1] == 1) == (stage == "decode"):
                raise RuntimeError(f"injected fault in {stage}")
            return by_group(self, site, h, x)

        def slot_residual(self, h, x):
            if weights in self.keep and stage == "decode":
                raise RuntimeError(f"injected fault in {stage}")
            return by_slot(self, h, x)

        monkeypatch.setattr(BottleneckAdapter, "residual", group_residual)
        monkeypatch.setattr(SiteSlots, "residual", slot_residual)
    return arm


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_layer_raising_fails_only_its_request(srv, poisoned, stage):
    poisoned(stage)
    faulty = [("poison-bn", _greedy(p)) for p in REF["prompts"][:2]]
    for r in _run_with_victims(srv, faulty):
        assert f"injected fault in {stage}" in _error(r, 500, "generation_failed")


@pytest.mark.parametrize("path,body,error", [
    ("/generate?adapter=poison-bn", {"stream": True, "max_new_tokens": N_NEW, "ignore_eos": True},
     {"type": "generation_failed"}),
    ("/v1/completions", {"model": "poison-bn", "stream": True, "max_tokens": N_NEW, "ignore_eos": True},
     {"type": "server_error", "code": "generation_failed", "param": None}),
    ("/generate_stream", {"parameters": {"adapter_id": "poison-bn", "max_new_tokens": N_NEW}},
     {"error_type": "generation"}),
], ids=["native", "openai", "lorax"])
def test_a_fault_after_the_stream_began_ends_it_with_an_error_in_its_apis_shape(srv, poisoned, path, body, error):
    """The 200 has gone with the first token (from the prefill); the decode step's fault is the
    stream's last event, shaped as the route's errors are: OpenAI clients read message, type,
    param and code, lorax-client reads error and error_type."""
    poisoned("decode")
    text = "def fibonacci(n):"  # tokens enough that the prefill is not a one-token (decode-shaped) step
    prompt = {"inputs": text} if path == "/generate_stream" else {"prompt": text}
    with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c, c.stream("POST", path, json={**prompt, **body}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200
    last = events[-1] if "error_type" in error else events[-1]["error"]
    assert error.items() <= last.items(), last
    assert "injected fault in decode" in (last["error"] if "error_type" in error else last["message"])


def test_sampling_raising_fails_only_its_request(srv, monkeypatch):
    sampled = [(None, _greedy(p, temperature=0.8, top_k=40, seed=s)) for s, p in enumerate(REF["prompts"])]
    solo = [_post(srv, *job).json()["token_ids"] for job in sampled]
    real = sampling.draw

    def draw(logits, params, gens):
        if any(p.seed == 666 for p in params):  # the batch's draw raises, then this row's alone
            raise RuntimeError("injected sampling fault")
        return real(logits, params, gens)

    monkeypatch.setattr(sampling, "draw", draw)
    faulty = [(None, _greedy(REF["prompts"][0], temperature=0.8, seed=666))]
    answers = _run_with_victims(srv, sampled + faulty)
    assert [r.json()["token_ids"] for r in answers[:3]] == solo  # seeded victims: same draws as alone
    assert "injected sampling fault" in _error(answers[3], 500, "generation_failed")


def test_sampler_setup_raising_fails_only_its_request(srv, monkeypatch):
    real = sampling.Sampler.for_params

    def for_params(params, device):
        if params.seed == 667:
            raise RuntimeError("Overflow when unpacking long (injected)")
        return real(params, device)

    monkeypatch.setattr(sampling.Sampler, "for_params", staticmethod(for_params))
    [r] = _run_with_victims(srv, [(None, _greedy(REF["prompts"][1], temperature=0.5, seed=667))])
    assert "setting up sampling" in _error(r, 500, "generation_failed")



def test_recording_a_requests_metrics_raising_fails_no_request(srv, monkeypatch):
    real = engine_module.record_finished

    def record_finished(metrics, req, status):
        if req.params.max_new_tokens == 3:
            raise ValueError("Counters can only be incremented by non-negative amounts (injected)")
        real(metrics, req, status)

    monkeypatch.setattr(engine_module, "record_finished", record_finished)
    [r] = _run_with_victims(srv, [(None, {**_greedy(REF["prompts"][2]), "max_new_tokens": 3})])
    assert r.status_code == 200 and r.json()["token_ids"] == REF["base_outputs"][2][:3]


def test_overflowing_adapter_ends_with_non_finite_error_naming_it(srv):
    faulty = [("overflow", _greedy(p)) for p in REF["prompts"]]
    for r in _run_with_victims(srv, faulty):
        message = _error(r, 422, "non_finite_logits")
        assert "'overflow'" in message and "lora" in message


def test_tiny_temperature_is_greedy_not_a_fault(srv):
    prompt, want = REF["prompts"][0], REF["base_outputs"][0]
    [r] = _run_with_victims(srv, [(None, _greedy(prompt, temperature=1e-40, seed=3))])
    assert r.status_code == 200 and r.json()["token_ids"] == want


def test_soft_prompt_longer_than_the_cache_capacity(srv):
    [r] = _run_with_victims(srv, [("long-prompt", _greedy(REF["prompts"][0]))])
    assert r.status_code == 200 and len(r.json()["token_ids"]) == N_NEW


def _base_state(srv) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in srv.app.state.base.hf.state_dict().items()}


def test_merge_raising_part_way_rolls_back_bit_exactly(srv, monkeypatch):
    before = _base_state(srv)
    real, calls = lora_layer._merge_module, []

    def merge_module(layer, w, saved):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (injected)")
        real(layer, w, saved)

    monkeypatch.setattr(lora_layer, "_merge_module", merge_module)
    faulty = [("lora-all-r16", _greedy(REF["prompts"][0], mode="merged"))]
    [r] = _run_with_victims(srv, faulty)
    assert "restored unchanged" in _error(r, 500, "generation_failed")
    after = _base_state(srv)
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(lora_layer, "_merge_module", real)
    merged = _post(srv, "lora-all-r16", _greedy(REF["prompts"][0], mode="merged"))
    assert merged.json()["token_ids"] == REF["adapters"]["lora-all-r16"]["outputs"][0]
    assert _post(srv, None, _greedy(REF["prompts"][1])).json()["token_ids"] == REF["base_outputs"][1]  # restores
    assert all(torch.equal(before[k], v) for k, v in _base_state(srv).items())


def test_server_healthy_after_faults(srv):
    with srv.client() as c:
        assert c.get("/health").status_code == 200
        assert all(a["in_use"] == 0 for a in c.get("/adapters").json()["adapters"])
    assert srv.app.state.engine.running == 0 and srv.app.state.engine.waiting == 0


# ---------------------------------------------------------------- a small batch: phases and step faults


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    with live_server(root, model=LLAMA, adapter=[f"lora-qv-r8={PEFT / 'lora-qv-r8'}"], max_batch_size=2,
                     phase_quantum_s=0.05) as server:
        yield server


def test_phase_switch_with_full_batch_never_livelocks(small):
    """Full batch, then a shared and a merged request waiting, no row finishing within the quantum:
    once the batch drains, the shared phase must run again, then the merged one."""
    long = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 60, "ignore_eos": True}
    jobs = [(None, long), (None, long), (None, _greedy(REF["prompts"][1])),
            ("lora-qv-r8", _greedy(REF["prompts"][2], mode="merged"))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = []
        for job in jobs:
            futures.append(pool.submit(_post, small, *job))
            time.sleep(0.05)  # arrive in this order
        answers = [f.result(timeout=WAIT_S) for f in futures]
    assert [r.status_code for r in answers] == [200] * 4
    assert answers[2].json()["token_ids"] == REF["base_outputs"][1]
    assert answers[3].json()["token_ids"] == REF["adapters"]["lora-qv-r8"]["outputs"][2]


def test_unpinnable_step_fault_fails_that_step_only(small, monkeypatch):
    """A fault outside any row's computation ends the rows of that step; the waiting ones are served."""
    real, fired = Engine._decode, []

    def decode(self):
        if not fired and len(self.batch) == 2:
            fired.append(1)
            raise RuntimeError("injected step fault")
        real(self)

    monkeypatch.setattr(Engine, "_decode", decode)
    prompts, outs = REF["prompts"], REF["base_outputs"]
    jobs = [_greedy(prompts[i % 3]) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for job in jobs:
            futures.append(pool.submit(_post, small, None, job))
            time.sleep(0.02)
        answers = [f.result(timeout=WAIT_S) for f in futures]
    failed = [r for r in answers if r.status_code != 200]
    assert len(failed) == 2 and all("injected step fault" in _error(r, 500, "generation_failed") for r in failed)
    for job, r in zip(jobs, answers):
        if r.status_code == 200:
            assert r.json()["token_ids"] == outs[prompts.index(job["prompt_token_ids"])]
