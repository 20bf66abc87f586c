"""The prompt cache: a prompt start another request computed is reused, block by block, under the
same context only (the base, one adapter in one mode; an aLoRA's blocks before its invocation are
the base's), with the same tokens as computing it; idle blocks are evicted, zeroed, before the pool
grows, and an evicted block's chain is never found again."""
from __future__ import annotations

import json
import re

import pytest
import torch
from openai import OpenAI

from server.engine.cache import BlockTable, KVCache
from tests.adapters.conftest import make_adapter
from tests.conftest import FIXTURES, LLAMA, live_server

PEFT = FIXTURES / "peft" / "tiny-llama"
HUB = FIXTURES / "adapterhub" / "tiny-llama"
ADAPTERS = [f"{n}={PEFT / n}" for n in ("lora-qv-r8", "prompt-16")] + [f"seq_bn-rf16={HUB / 'seq_bn-rf16'}"]
INVOCATION = [1000, 2000, 3000]
B = 16  # --kv-block-tokens (the default)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(4, 900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def alora(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("alora") / "alora", "llama", 7, r=4, lora_alpha=16,
                        target_modules=["q_proj", "v_proj"], alora_invocation_tokens=INVOCATION)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, alora):
    with live_server(tmp_path_factory.mktemp("cached"), model=LLAMA, adapter=[*ADAPTERS, f"alora={alora}"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(tmp_path_factory, alora):
    with live_server(tmp_path_factory.mktemp("plain"), model=LLAMA, adapter=[*ADAPTERS, f"alora={alora}"],
                     prompt_cache=False) as srv:
        yield srv


def _generate(srv, adapter: str | None, prompt: list[int], **extra) -> dict:
    return srv.generate(adapter, **{"prompt_token_ids": prompt, "max_new_tokens": 6, "ignore_eos": True, **extra})


def _metric(srv, name: str, labels: str) -> float:
    with srv.client() as c:
        text = c.get("/metrics").text
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _cached_tokens(srv, kind: str) -> float:
    return _metric(srv, "hotswap_prompt_cached_tokens_total", f'kind="{kind}"')


@pytest.mark.parametrize(("adapter", "kind", "virtual", "extra"), [
    (None, "base", 0, {}), ("lora-qv-r8", "lora", 0, {}), ("lora-qv-r8", "lora", 0, {"mode": "merged"}),
    ("prompt-16", "prompt", 16, {}), ("seq_bn-rf16", "bottleneck", 0, {})])
def test_a_prompt_start_is_reused_with_the_same_tokens(cached, plain, adapter, kind, virtual, extra):
    first = _prompt(hash((adapter, str(extra))) % 1000, 50)
    longer = first + _prompt(1, 20)
    before = _cached_tokens(cached, kind)
    for prompt in (first, first, longer):
        assert _generate(cached, adapter, prompt, **extra)["token_ids"] == \
            _generate(plain, adapter, prompt, **extra)["token_ids"]
    published = (virtual + 50) // B  # full blocks of the first prompt
    again = min(published, (virtual + 50 - 1) // B) * B - virtual  # its last token is always computed
    extended = min(published, (virtual + 70 - 1) // B) * B - virtual
    assert _cached_tokens(cached, kind) - before == again + extended
    assert _cached_tokens(plain, kind) == 0


def test_an_adapters_blocks_are_not_the_bases(cached, plain):
    prompt = _prompt(77, 40)
    _generate(cached, None, prompt)
    before = _cached_tokens(cached, "lora")
    assert _generate(cached, "lora-qv-r8", prompt)["token_ids"] == _generate(plain, "lora-qv-r8", prompt)["token_ids"]
    assert _cached_tokens(cached, "lora") == before


def test_an_alora_reuses_the_base_blocks_before_its_invocation(cached, plain):
    context = _prompt(5, 40)
    _generate(cached, None, context)  # the base computed the conversation so far
    asked = context + INVOCATION + _prompt(6, 5)  # lora_start = 40: blocks 0-1 (positions 0-31) are the base's
    before = _cached_tokens(cached, "lora")
    assert _generate(cached, "alora", asked)["token_ids"] == _generate(plain, "alora", asked)["token_ids"]
    assert _cached_tokens(cached, "lora") - before == 2 * B


def _score(srv, prompt: list[int]) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}
    with srv.client() as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]


def test_a_request_scoring_its_prompt_computes_all_of_it(cached, plain):
    prompt = _prompt(9, 40)
    _generate(cached, None, prompt)
    before = _cached_tokens(cached, "base")
    scored = _score(cached, prompt)
    assert _cached_tokens(cached, "base") == before
    assert scored["token_logprobs"] == _score(plain, prompt)["token_logprobs"]


def test_cached_blocks_are_kept_apart_from_the_blocks_rows_hold(cached):
    _generate(cached, None, _prompt(11, 64))
    assert _metric(cached, "hotswap_kv_cache_bytes", 'state="used"') == 0
    assert _metric(cached, "hotswap_kv_cache_bytes", 'state="cached"') > 0


def _published_row(cache: KVCache, tokens: int, ctx=None) -> tuple[BlockTable, list]:
    table = BlockTable()
    cache.fit(table, tokens)
    chain = [(ctx, tuple(range(i, i + B))) for i in range(0, tokens - tokens % B, B)]
    cache.pool[:, :, table.blocks] = 1.0  # the row's KV
    cache.prompts.publish(table.blocks[: len(chain)], chain)
    return table, chain


def test_idle_blocks_are_evicted_zeroed_before_the_pool_grows_and_their_chains_are_gone():
    cache = KVCache(1, 1, 4, 4096, torch.float32, "cpu", block_tokens=B, initial_blocks=8)  # 6 usable blocks
    first, chain = _published_row(cache, 3 * B)
    blocks = list(first.blocks)
    cache.release(first)
    assert cache.blocks_used == 0 and cache.blocks_cached == 3
    assert cache.prompts.take(chain[:2]) == blocks[:2]  # a later row takes two of them
    assert cache.blocks_cached == 1
    other = BlockTable()
    cache.fit(other, 4 * B)  # 3 free + the idle one evicted: no growth
    assert cache.n_blocks == 8 and blocks[2] in other.blocks
    assert torch.all(cache.pool[:, :, blocks[2]] == 0)  # zeroed when evicted
    assert cache.prompts.take(chain) == blocks[:2]  # the chain now ends where the eviction cut it
    for block in blocks[:2] * 2:  # both takes let go
        cache.prompts.release(block)
    assert cache.blocks_cached == 2


def test_a_shared_block_is_held_until_its_last_row_lets_go():
    cache = KVCache(1, 1, 4, 4096, torch.float32, "cpu", block_tokens=B, initial_blocks=8)
    first, chain = _published_row(cache, 2 * B + 3)
    second = BlockTable(cache.prompts.take(chain))
    cache.fit(second, 2 * B + 9)  # its own third block after the shared two
    cache.release(first)
    assert cache.blocks_cached == 0  # still held by the second row
    assert torch.all(cache.pool[:, :, second.blocks[:2]] == 1.0)
    cache.release(second)
    assert cache.blocks_cached == 2 and cache.blocks_used == 0


def test_usage_reports_the_cached_prompt_tokens_to_the_openai_client(cached):
    client = OpenAI(base_url=f"{cached.url}/v1", api_key="unused")
    prompt = _prompt(21, 40)
    first, again = (client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=2, temperature=0)
                    for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 2 * B  # (40 - 1) // 16 blocks
    assert again.choices[0].text == first.choices[0].text


def test_an_alora_block_is_found_only_for_the_same_invocation_position(cached, plain):
    """The KV of a block past the invocation depend on where the last full invocation starts, which
    the tokens after the block decide: two prompts sharing a first block but not that position."""
    head = [5, 6, *INVOCATION, *_prompt(30, 9), *INVOCATION[:2]]  # 16 tokens: an invocation at 2, a partial one at 14
    late = head + [INVOCATION[2], *_prompt(31, 20)]  # the last full invocation starts at 14
    early = head + _prompt(32, 20)  # ... at 2
    before = _cached_tokens(cached, "lora")
    _generate(cached, "alora", late)
    assert _generate(cached, "alora", early)["token_ids"] == _generate(plain, "alora", early)["token_ids"]
    assert _cached_tokens(cached, "lora") == before


def test_padding_past_a_rows_end_is_shown_to_the_model_at_that_rows_last_position():
    """A row resuming at position 100 with one token, beside a fresh row of 20: its 19 padding tokens
    must not pass position ids past its context (an embedding index error on learned positions)."""
    cache = KVCache(1, 1, 4, 4096, torch.float32, "cpu", block_tokens=B, initial_blocks=16)
    shape = cache.step([BlockTable(), BlockTable()], [100, 0], 20, ends=[101, 20])
    assert shape.positions.tolist() == [[100] * 20, list(range(20))]



def test_blocks_of_virtual_positions_only_count_no_prompt_tokens(tmp_path, plain):
    """Without the prefix cache a soft prompt's virtual positions go into the row's blocks; a later
    request may reuse blocks that hold only (some of) them: it was served none of its prompt
    tokens from the cache, and the rows decoding beside it go on unharmed."""
    with live_server(tmp_path, model=LLAMA, adapter=[f"prompt-16={PEFT / 'prompt-16'}"], prefix_cache=False,
                     kv_block_tokens=5) as srv:  # prompt-16's 16 virtual positions fill 3 blocks, spill into a 4th
        base = {"prompt_token_ids": _prompt(20, 4), "max_new_tokens": 300, "ignore_eos": True}
        want_base = _generate(srv, None, base["prompt_token_ids"], max_new_tokens=300)["token_ids"]
        _generate(srv, "prompt-16", _prompt(21, 3))  # publishes the 3 blocks of virtual positions
        with srv.client() as c, c.stream("POST", "/generate", json={**base, "stream": True}) as stream:
            events = (json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: "))
            next(events)  # the base row decodes
            again = _generate(srv, "prompt-16", _prompt(22, 3))  # reuses those 3 blocks: 15 of 16 virtual
            *_, final = events
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["token_ids"] == _generate(plain, "prompt-16", _prompt(22, 3))["token_ids"]
    assert final["finish_reason"] == "length" and final["token_ids"] == want_base
