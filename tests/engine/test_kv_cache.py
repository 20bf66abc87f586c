"""The paged KV cache: a row holds the blocks its tokens fill and gives them back when it ends;
rows of very different lengths in one batch decode as each would alone, and the memory held
follows the tokens held, not rows x the longest row."""
from __future__ import annotations

import httpx
import pytest
import torch

from server import kernels
from server.engine import paged_attention
from server.engine.cache import NULL_BLOCK, SINK_BLOCK, BlockTable, KVCache
from server.model import load_base_model
from tests.conftest import LLAMA, live_server

B = 16


def _cache(**kw) -> KVCache:
    return KVCache(n_layers=2, n_kv_heads=2, head_dim=4, max_len=4096, dtype=torch.float32,
                   device=torch.device("cpu"), block_tokens=B, **kw)


def test_blocks_are_fitted_released_and_come_back_zeroed():
    cache = _cache(initial_blocks=4)
    a, b = BlockTable(), BlockTable()
    cache.fit(a, 17)  # two blocks
    cache.fit(b, 1)
    assert len(a.blocks) == 2 and len(b.blocks) == 1 and cache.blocks_used == 3
    assert NULL_BLOCK not in a.blocks + b.blocks and SINK_BLOCK not in a.blocks + b.blocks
    cache.pool[:, :, a.blocks] = 7.0
    cache.fit(a, 100)  # the pool doubles to make room; what a row held stays
    assert len(a.blocks) == 7 and cache.n_blocks >= 9
    assert torch.all(cache.pool[:, :, a.blocks[:2]] == 7.0)
    held = list(a.blocks)
    cache.release(a)
    assert a.blocks == [] and cache.blocks_used == 1
    assert torch.all(cache.pool[:, :, held] == 0)  # no row ever reads another request's values
    assert torch.all(cache.pool[:, :, NULL_BLOCK] == 0)


def test_a_step_reads_a_rows_blocks_as_they_are_now():
    """A table's tensor is made once per change of its blocks: a step after a fit, a reuse of cached
    prompt blocks or a release reads the blocks the row holds then."""
    cache = _cache(initial_blocks=8)
    row = BlockTable()
    cache.fit(row, 17)
    assert cache.step([row], [16], 1).table.tolist() == [row.blocks]
    cache.fit(row, 40)  # a third block
    assert cache.step([row], [39], 1).table.tolist() == [row.blocks] and len(row.blocks) == 3
    held = row.blocks
    row.blocks = held[1:]  # assigned, as a prompt-cache reuse does
    assert cache.step([row], [20], 1).table.tolist() == [held[1:]]
    row.blocks = held
    cache.release(row)
    assert row.row().tolist() == []


def test_a_step_fits_the_rows_that_need_a_block_and_refuses_a_row_past_the_context():
    """A decode step gives a block to the rows crossing into one, and to those only; a row past the
    context is refused even where its last block would hold the position."""
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=4, max_len=40, dtype=torch.float32,
                    device=torch.device("cpu"), block_tokens=B, initial_blocks=8)
    crossing, inside = BlockTable(), BlockTable()
    cache.fit(crossing, 16)
    cache.fit(inside, 3)
    shape = cache.step([crossing, inside], [16, 3], 1)
    assert (len(crossing.blocks), len(inside.blocks)) == (2, 1)
    assert shape.slot_blocks.tolist() == [crossing.blocks[1], inside.blocks[0]]
    last = BlockTable()
    cache.fit(last, 40)  # three blocks: room for 48 positions, a context of 40
    with pytest.raises(ValueError, match="exceeds the context length 40"):
        cache.step([last], [40], 1)
    with pytest.raises(ValueError, match="exceeds the context length 40"):
        cache.decode_inputs([last], [40], [5], 1, 4)


def test_prefix_written_and_read_back_through_the_blocks():
    cache = _cache()
    keys = [torch.randn(2, 37, 4) for _ in range(2)]  # [Hkv, P, D] per layer
    values = [torch.randn(2, 37, 4) for _ in range(2)]
    row = BlockTable()
    cache.fit(row, 5)  # a block already held, as a row may
    cache.load_prefix(row, keys, values)
    got_k, got_v = cache.read_prefix(row, 37)
    assert all(torch.equal(g, w) for g, w in zip(got_k + got_v, keys + values))


@pytest.fixture(scope="module")
def llama():
    return load_base_model(LLAMA, device="cpu", dtype="float32")


def _greedy(bm, prompts: list[list[int]], new: int) -> tuple[list[list[int]], KVCache, list[BlockTable]]:
    """Greedy decoding of a batch through one paged cache: prefill all rows together, then steps."""
    g, dec, n = bm.geometry, bm.decoder, len(prompts)
    cache = KVCache(g.n_layers, g.n_kv_heads, g.head_dim, g.max_len, bm.dtype, bm.device, B)
    tables = [BlockTable() for _ in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])  # [N, L]
    with torch.inference_mode():
        shape = cache.step(tables, [0] * n, width, [len(p) for p in prompts])  # padding to the sink block
        hidden = dec.forward(dec.embed(ids), shape, cache)  # [N, L, H]
        tokens = [dec.logits(hidden[torch.arange(n), torch.tensor([len(p) - 1 for p in prompts])]).argmax(-1)]
        lengths = [len(p) for p in prompts]
        for _ in range(new - 1):
            hidden = dec.forward(dec.embed(tokens[-1][:, None]), cache.step(tables, lengths, 1), cache)
            tokens.append(dec.logits(hidden[:, 0]).argmax(-1))
            lengths = [x + 1 for x in lengths]
    return torch.stack(tokens, 1).tolist(), cache, tables


def test_32_rows_of_very_different_lengths_hold_blocks_for_their_tokens_only(llama):
    lengths = [1 + (i * 13) % 40 for i in range(31)] + [600]  # 1 .. 40 tokens, and one of 600
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 4000, (n,), generator=gen).tolist() for n in lengths]
    new = 4
    tokens, cache, tables = _greedy(llama, prompts, new)
    held = [n + new - 1 for n in lengths]  # positions cached after the last step
    assert [len(t.blocks) for t in tables] == [-(-n // B) for n in held]
    assert cache.blocks_used == sum(-(-n // B) for n in held)
    pool = cache.n_blocks * cache.bytes_per_block  # the whole pool, free blocks included
    assert pool <= 2 * (cache.blocks_used + 2) * cache.bytes_per_block  # it doubles only when full
    dense = len(prompts) * max(held) * cache.bytes_per_block // B  # rows x the longest row, as before
    assert pool < 0.2 * dense
    for i in (0, 5, 17, 31):  # a short row beside long ones, and long rows: each as alone
        alone, _, _ = _greedy(llama, [prompts[i]], new)
        assert tokens[i] == alone[0], f"row {i} ({lengths[i]} tokens)"


def test_blocks_return_to_the_pool_when_requests_end(tmp_path):
    with live_server(tmp_path, model=LLAMA) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for n in (3, 40, 200):
                r = client.post("/generate", json={"prompt_token_ids": list(range(2, 2 + n)), "max_new_tokens": 5})
                assert r.status_code == 200
            metrics = client.get("/metrics").text
    used = [line for line in metrics.splitlines() if line.startswith('hotswap_kv_cache_bytes{state="used"}')]
    allocated = [line for line in metrics.splitlines() if line.startswith('hotswap_kv_cache_bytes{state="allocated"}')]
    assert used and float(used[0].split()[-1]) == 0.0
    assert allocated and float(allocated[0].split()[-1]) > 0.0


def _reference(q, pool_k, pool_v, table, lengths, scale, window, softcap):
    """What the kernel computes, the slow way: each row over its gathered keys, fp32 softmax."""
    outs = []
    for n in range(q.shape[0]):
        keys = pool_k[table[n]].transpose(0, 1).flatten(1, 2)[:, : lengths[n]].float()  # [Hkv, T, D]
        values = pool_v[table[n]].transpose(0, 1).flatten(1, 2)[:, : lengths[n]].float()
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [Hq, T, D]
        scores = torch.einsum("hd,htd->ht", q[n].float(), keys) * scale  # [Hq, T]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if window:
            scores[:, : max(0, int(lengths[n]) - window)] = float("-inf")
        outs.append(torch.einsum("ht,htd->hd", scores.softmax(-1), values))  # [Hq, D]
    return torch.stack(outs)  # [N, Hq, D]


@pytest.mark.parametrize(("dtype", "heads", "dim", "window", "softcap"), [
    (torch.float32, (12, 4), 64, 0, 0.0), (torch.float32, (8, 8), 128, 0, 0.0), (torch.float32, (4, 2), 48, 20, 0.0),
    (torch.float32, (6, 2), 64, 0, 50.0), (torch.bfloat16, (8, 2), 64, 0, 0.0)])
def test_cpu_decode_kernel_equals_attention_over_each_rows_own_keys(dtype, heads, dim, window, softcap):
    if kernels.cpu() is None:
        pytest.skip("no C++ compiler here: the gather path serves (and is what the other tests then check)")
    hq, hkv = heads
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 5, 16, 17, 40, 3])
    width = 3
    table = torch.randperm(30, generator=gen)[: len(lengths) * width].view(-1, width) + 2  # [N, W]
    pool_k = torch.randn(40, hkv, B, dim, generator=gen).to(dtype)
    pool_v = torch.randn(40, hkv, B, dim, generator=gen).to(dtype)
    q = torch.randn(len(lengths), hq, dim, generator=gen).to(dtype)
    got = paged_attention.decode(q[:, :, None], pool_k, pool_v, table, lengths, 0.125, window or None,
                                 softcap or None)[:, 0]  # [N, Hq, D]
    want = _reference(q, pool_k, pool_v, table, lengths, 0.125, window, softcap)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)


def test_decode_gathering_blocks_gives_the_kernels_tokens(llama, monkeypatch):
    """Where no kernel serves (none built, or Triton failed its check) decode gathers the rows' blocks for
    SDPA: same tokens."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 4000, (n,), generator=gen).tolist() for n in (3, 70, 20, 33)]
    with_kernel, _, _ = _greedy(llama, prompts, 6)
    monkeypatch.setattr(paged_attention, "usable", lambda query, pool: False)
    gathered, _, _ = _greedy(llama, prompts, 6)
    assert gathered == with_kernel
