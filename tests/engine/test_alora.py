"""aLoRA rows before their invocation are base rows: their KV entries are the base model's, bit for
bit, so a prefix computed for the base (or another aLoRA on it) serves them; from the invocation on
they differ."""
from __future__ import annotations

import asyncio

import torch

from server.adapters.adapter import Adapter
from server.adapters.alora import NEVER, activation_start
from server.adapters.kinds import load_weights
from server.adapters.lora import ensure_wrapped
from server.engine.cache import KVCache
from server.engine.engine import EngineSettings
from server.engine.prefill import Prefiller
from server.engine.request import Request
from server.engine.sampling import SamplingParams
from server.model import load_base_model
from tests.adapters.conftest import make_adapter
from tests.conftest import LLAMA

INVOCATION = [1000, 2000, 3000]


def test_activation_start_is_the_last_full_occurrence():
    assert activation_start([1, 2, 3, 9, 1, 2, 3, 4], [1, 2, 3]) == 4
    assert activation_start([1, 2, 3, 9, 1, 2], [1, 2, 3]) == 0  # a partial one at the end does not count
    assert activation_start([1, 2, 9, 2, 3], [1, 2, 3]) is None
    assert activation_start([3], [1, 2, 3]) is None


def _request(prompt: list[int], adapter: Adapter | None) -> Request:
    mode = "unmerged" if adapter else "none"
    return Request(prompt, SamplingParams(max_new_tokens=1), adapter, mode, asyncio.new_event_loop(), None)


def _kv(prefiller: Prefiller, req: Request) -> list[torch.Tensor]:
    """Prefill one row alone -> its keys per layer [Hkv, L, D]."""
    prefiller.prefill([req])
    return prefiller.cache.read_prefix(req.kv, len(req.prompt_ids))[0]


@torch.inference_mode()
def test_kv_before_the_invocation_is_the_base_models(tmp_path):
    base = load_base_model(LLAMA, device="cpu", dtype="float32")
    folders = [make_adapter(tmp_path / f"a{i}", "llama", 20 + i, r=4, target_modules=["k_proj", "v_proj", "up_proj"],
                            alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM") for i in range(2)]
    adapters = []
    for i, folder in enumerate(folders):
        kind, weights = load_weights(folder, base)
        ensure_wrapped(base.hf, weights.modules, base.lora_ctx)
        adapters.append(Adapter(f"a{i}", kind, weights, "unmerged", "test"))
    g = base.geometry
    cache = KVCache(g.n_layers, g.n_kv_heads, g.head_dim, g.max_len, base.dtype, base.device)
    prefiller = Prefiller(base, cache, EngineSettings())
    prompt = [5, 17, 301, 42, *INVOCATION, 999, 7]
    partial = prompt[:6]  # the invocation cut short
    reqs = [_request(prompt, None), _request(prompt, adapters[0]), _request(prompt, adapters[1]),
            _request(partial, None), _request(partial, adapters[0])]
    assert [r.lora_start for r in reqs] == [0, 4, 4, 0, NEVER]
    base_kv, first, second, base_partial, alora_partial = (_kv(prefiller, r) for r in reqs)
    for layer, keys in enumerate(base_kv):
        for kv in (first, second):
            assert torch.equal(kv[layer][:, :4], keys[:, :4])  # before the invocation: the base's, bit for bit
        assert torch.equal(alora_partial[layer], base_partial[layer])  # no full invocation: the base throughout
    assert not torch.equal(first[1][:, 4:], base_kv[1][:, 4:])  # from the invocation on: the adapter's
    assert not torch.equal(first[1][:, 4:], second[1][:, 4:])
