"""The `adapters` field on every generation surface (native, OpenAI, LoRAX's merged_adapters), what
each refuses with a 4xx naming the field, and body fields that would change meaning if dropped."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from lorax import Client
from lorax.errors import ValidationError
from lorax.types import MergedAdapters
from openai import BadRequestError, OpenAI

from tests.adapters.conftest import make_adapter
from tests.conftest import FIXTURES, LLAMA, LiveServer, live_server

PEFT = FIXTURES / "peft" / "tiny-llama"
HUB = FIXTURES / "adapterhub" / "tiny-llama"
PAIR = [{"name": "qv", "weight": 0.7}, {"name": "all", "weight": 0.3}]
BODY = {"prompt": "def add(a, b):", "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("compose")
    alora = make_adapter(root / "alora", "llama", 3, r=2, target_modules=["q_proj"], alora_invocation_tokens=[5, 6],
                         task_type="CAUSAL_LM")
    dora = make_adapter(root / "dora", "llama", 4, r=2, use_dora=True, target_modules=["q_proj"])
    adapters = [f"qv={PEFT / 'lora-qv-r8'}", f"all={PEFT / 'lora-all-r16'}", f"soft={PEFT / 'prompt-16'}",
                f"bn={HUB / 'seq_bn-rf16'}", f"bn2={HUB / 'double_seq_bn-rf8'}", f"alora={alora}", f"dora={dora}"]
    with live_server(root / "srv", model=LLAMA, adapter=adapters) as server:
        yield server


def _post(srv: LiveServer, path: str, body: dict, **params):
    with srv.client() as c:
        return c.post(path, params=params, json=body)


def _refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert all(w in message for w in words), message
    return message


def test_openai_adapters_field_and_model_label(srv):
    native = srv.generate(adapters=PAIR + [{"name": "soft"}], **BODY)
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny-llama", prompt=BODY["prompt"], max_tokens=6, temperature=0,
                                    extra_body={"adapters": PAIR + [{"name": "soft"}], "ignore_eos": True})
    assert out.choices[0].text == native["text"]
    assert out.model == native["adapter"] == "all*0.3+qv*0.7+soft"
    assert out.usage.prompt_tokens == native["usage"]["prompt_tokens"]  # both count the 16 virtual tokens
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, extra_body={"adapters": PAIR})
    assert chat.model == "all*0.3+qv*0.7" and chat.choices[0].message.content is not None
    one = client.completions.create(model="tiny-llama", prompt="x", max_tokens=2, extra_body={"adapters": [{"name": "qv"}]})
    assert one.model == "qv"  # a list of one at weight 1 runs that adapter, and says so
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model="qv", prompt="x", max_tokens=2, extra_body={"adapters": PAIR})
    assert e.value.body["param"] == "model" and "base model" in e.value.body["message"]


def test_lorax_merged_adapters_is_the_adapters_list(srv):
    native = srv.generate(adapters=PAIR, **BODY)
    client = Client(srv.url)
    merged = MergedAdapters(ids=["qv", "all"], weights=[0.7, 0.3], merge_strategy="linear", density=1.0)
    out = client.generate(BODY["prompt"], merged_adapters=merged, max_new_tokens=6, ignore_eos_token=True)
    assert out.generated_text == native["text"]
    ties = MergedAdapters(ids=["qv", "all"], weights=[0.7, 0.3], merge_strategy="ties", density=0.5)
    with pytest.raises(ValidationError, match="merge_strategy: expected linear"):
        client.generate(BODY["prompt"], merged_adapters=ties, max_new_tokens=2)


@pytest.mark.parametrize("adapters,status,words", [
    ([{"name": "soft", "weight": 0.5}], 400, ("weight 1.0", "'soft'")),
    ([{"name": "bn"}, {"name": "bn2"}], 400, ("at most one bottleneck adapter",)),
    ([{"name": "qv"}, {"name": "qv", "weight": 2}], 400, ("'qv' more than once",)),
    ([{"name": "alora"}, {"name": "qv"}], 400, ("aLoRA alone",)),
    ([{"name": "dora"}, {"name": "qv"}], 400, ("'dora' with DoRA",)),
    ([{"name": "qv", "weight": 0.5, "scale": 2}], 400, ("scale",)),
    ([], 400, ("adapters",)),
    ([{"name": "qv"}, {"name": "nope"}], 404, ("'nope'",)),
])
def test_refused_combinations_name_what_is_wrong(srv, adapters, status, words):
    _refused(_post(srv, "/generate", {**BODY, "adapters": adapters}), status, *words)
    assert all(e.adapter is None or e.adapter.users == 0 for e in srv.app.state.registry.all())  # nothing held


def test_query_and_list_together_is_refused(srv):
    _refused(_post(srv, "/generate", {**BODY, "adapters": PAIR}, adapter="qv"), 400, "adapters", "both")


def test_merged_mode_refused_for_alora_and_without_lora(srv):
    for adapters in ([{"name": "alora"}], [{"name": "alora", "weight": 0.5}, {"name": "soft"}]):
        _refused(_post(srv, "/generate", {**BODY, "adapters": adapters, "mode": "merged"}), 400, "aLoRA")
    _refused(_post(srv, "/generate", {**BODY, "mode": "merged"}, adapter="alora"), 400, "aLoRA", "unmerged")
    _refused(_post(srv, "/generate", {**BODY, "adapters": [{"name": "soft"}, {"name": "bn"}], "mode": "merged"}),
             400, "LoRA adapters only")
    assert srv.generate(adapters=[{"name": "soft"}, {"name": "bn"}], **BODY)["kind"] == "prompt+bottleneck"


def test_fields_in_the_wrong_place_are_refused(srv):
    _refused(_post(srv, "/generate", {**BODY, "adapter": "qv"}), 400, "adapter:", "?adapter=NAME")
    _refused(_post(srv, "/generate", {**BODY, "max_tokens": 3}), 400, "max_tokens:", "max_new_tokens")
    r = _post(srv, "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "adapter": "qv"})
    assert _refused(r, 400, "`model`").startswith("adapter:") and r.json()["error"]["param"] == "adapter"
    r = _post(srv, "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "presence_penalty": 0})
    assert r.status_code == 200  # OpenAI fields we do not act on stay accepted, as clients send them
    _refused(_post(srv, "/", {"inputs": "x", "parameters": {"adapter": "qv"}}), 400, "parameters.adapter_id")


def test_alora_default_mode_merged_is_refused_at_upload(srv, tmp_path):
    folder = make_adapter(tmp_path / "a", "llama", 5, r=2, target_modules=["v_proj"], alora_invocation_tokens=[9],
                          task_type="CAUSAL_LM")
    files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir()]
    with srv.client() as c:
        r = c.post("/adapters", data={"name": "a2", "default_mode": "merged"}, files=files)
        _refused(r, 400, "default_mode", "aLoRA")
        r = c.post("/adapters", data={"name": "a2"}, files=files)
    assert r.status_code == 201 and r.json()["details"]["alora_invocation_tokens"] == [9]


def test_more_adapters_than_resident_slots_is_refused_at_once(tmp_path):
    adapters = [f"qv={PEFT / 'lora-qv-r8'}", f"all={PEFT / 'lora-all-r16'}", f"soft={PEFT / 'prompt-16'}"]
    with live_server(tmp_path, model=LLAMA, adapter=adapters, max_resident_adapters=2) as server:
        t0 = time.monotonic()
        r = _post(server, "/generate", {**BODY, "adapters": [*PAIR, {"name": "soft"}]})
        _refused(r, 400, "at most 2 adapters", "--max-resident-adapters", "got 3")
        assert time.monotonic() - t0 < 10  # not after waiting out the acquisition timeout for a slot
        assert len(server.generate(adapters=PAIR, **BODY)["token_ids"]) == 6  # two still fit


def test_kept_combinations_count_in_adapter_memory_and_stay_within_its_limit(tmp_path):
    """A combination of qv and all holds their weighted sum (as many bytes as both): it counts in
    hotswap_adapter_memory_bytes, and combinations are kept only in what --max-adapter-memory-bytes
    leaves beside the resident adapters (here room for one: the second drops the first)."""
    adapters = [f"qv={PEFT / 'lora-qv-r8'}", f"all={PEFT / 'lora-all-r16'}"]
    with live_server(tmp_path / "probe", model=LLAMA, adapter=adapters) as probe:
        for name in ("qv", "all"):
            probe.generate(name, **BODY)  # resident: its memory_bytes are known
        both = _memory_bytes(probe, "qv") + _memory_bytes(probe, "all")
    limit = 2 * both + both // 2
    with live_server(tmp_path / "srv", model=LLAMA, adapter=adapters, max_adapter_memory_bytes=limit) as server:
        for weights in ((0.7, 0.3), (0.6, 0.4)):
            body = {**BODY, "adapters": [{"name": "qv", "weight": weights[0]}, {"name": "all", "weight": weights[1]}]}
            assert len(server.generate(**body)["token_ids"]) == 6
            assert _gauge(server) == 2 * both <= limit


def _memory_bytes(server: LiveServer, name: str) -> int:
    with server.client() as c:
        return c.get(f"/adapters/{name}").json()["memory_bytes"]


def _gauge(server: LiveServer) -> float:
    with server.client() as c:
        lines = c.get("/metrics").text.splitlines()
    return sum(float(line.rpartition(" ")[2]) for line in lines if line.startswith("hotswap_adapter_memory_bytes{"))


def test_per_adapter_request_counts_name_a_combinations_members(tmp_path):
    """With --metrics-per-adapter-limit 3, combinations at three weights and then qv alone: each request
    counts under its registered adapters' own names (a combination's name, weights in it, would take a
    series per weight and push qv itself into __other__)."""
    adapters = [f"qv={PEFT / 'lora-qv-r8'}", f"all={PEFT / 'lora-all-r16'}"]
    with live_server(tmp_path, model=LLAMA, adapter=adapters, metrics_per_adapter_limit=3) as server:
        for w in (0.1, 0.2, 0.3):
            server.generate(**{**BODY, "adapters": [{"name": "qv", "weight": w}, {"name": "all", "weight": 1 - w}]})
        server.generate("qv", **BODY)
        with server.client() as c:
            lines = [line for line in c.get("/metrics").text.splitlines()
                     if line.startswith("hotswap_adapter_requests_total{")]
    assert sorted(lines) == ['hotswap_adapter_requests_total{adapter="all"} 3.0',
                             'hotswap_adapter_requests_total{adapter="qv"} 4.0']
