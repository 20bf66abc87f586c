"""The Triton paged decode kernel (server/kernels/attention_triton.py): each row over its own keys, read
where they lie in the pool, equals attention over that row's keys gathered; its first-use check turns
a wrong or failing kernel into the gather path; a model decoding on it gives the gather path's logits.

Without CUDA the kernels run interpreted on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
their tl.dot held to what a GPU does (`interpreter_as_the_gpu`)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from server import kernels  # noqa: E402 - after the skip: these import triton
from server.engine import paged_attention  # noqa: E402
from server.kernels import attention_triton  # noqa: E402
from tests.models.conftest import NEW, PROMPTS, greedy, served  # noqa: E402
from tests.models.families import build  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LENGTHS = [1, 7, 16, 17, 150, 3]  # one row far longer than the others; most not whole blocks
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def interpreter_as_the_gpu(monkeypatch):
    """Hold the interpreter to what a GPU does with tl.dot: sizes as the compiler for an H100 demands
    (the interpreter takes any; 16-bit inputs need K >= 16), and bfloat16 operands as numbers (the
    interpreter multiplies their uint16 bit patterns: triton-lang/triton#11584, not supported yet)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import min_dot_size
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    monkeypatch.setitem(builder.codegen_fns, "min_dot_size", min_dot_size(GPUTarget("cuda", 90, 32)))
    dot = builder.create_dot

    def as_float32(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle(interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
                                        .view(np.float32), tl.float32)

    monkeypatch.setattr(builder, "create_dot", lambda a, b, *rest: dot(as_float32(a), as_float32(b), *rest))


@pytest.fixture
def fresh_checks():
    paged_attention._triton_checked.cache_clear()
    yield
    paged_attention._triton_checked.cache_clear()


def _problem(dtype, heads, kv_heads, dim, block, window=None, seed=0):
    """q [N, Hq, D]; pools [blocks, Hkv, B, D] holding each row's blocks scattered out of order; table
    [N, W] padded with the null block; lengths [N]. Every pool entry a row does not see is NaN (the null
    block, the ends of last blocks, keys before a window): reading one poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    need = [-(-n // block) for n in LENGTHS]
    n_blocks = sum(need) + 5  # null block, sink block, three never used
    ids = (torch.randperm(n_blocks - 2, generator=gen)[: sum(need)] + 2).split(need)
    table = torch.zeros(len(LENGTHS), max(need), dtype=torch.long)  # [N, W]: 0, the null block, past a row
    pools = [torch.full((n_blocks, kv_heads, block, dim), float("nan")) for _ in range(2)]
    for n, (length, row) in enumerate(zip(LENGTHS, ids)):
        table[n, : len(row)] = row
        pos = torch.arange(max(0, length - window) if window else 0, length)  # the keys row n sees
        for pool in pools:
            pool[table[n, pos // block], :, pos % block] = torch.randn(len(pos), kv_heads, dim, generator=gen)
    q = torch.randn(len(LENGTHS), heads, dim, generator=gen)
    return [t.to(dtype) for t in (q, *pools)] + [table, lengths]


def _reference(q, pool_k, pool_v, table, lengths, scale, window, softcap):
    """Row by row in float32, over the row's keys picked out of the pool: SDPA, or softcapped by hand."""
    block, outs = pool_k.shape[2], []
    for n, length in enumerate(lengths.tolist()):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        keys, values = (pool[table[n, pos // block], :, pos % block].transpose(0, 1).float()
                        for pool in (pool_k, pool_v))  # [Hkv, T, D]
        query = q[n, :, None].float()  # [Hq, 1, D]
        if softcap is None:
            outs.append(F.scaled_dot_product_attention(query[None], keys[None], values[None], scale=scale,
                                                       enable_gqa=True)[0, :, 0])
            continue
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [Hq, T, D]
        scores = softcap * torch.tanh(query @ keys.transpose(1, 2) * scale / softcap)  # [Hq, 1, T]
        outs.append((scores.softmax(-1) @ values)[:, 0])
    return torch.stack(outs)  # [N, Hq, D]


@pytest.mark.parametrize(("dtype", "heads", "dim", "window", "softcap", "splits", "block"), [
    pytest.param(torch.float32, (4, 4), 32, None, None, 1, 16, id="mha"),
    pytest.param(torch.float32, (8, 2), 80, None, None, 1, 16, id="gqa-dim80"),
    pytest.param(torch.float32, (4, 2), 48, 20, None, 1, 16, id="window"),
    pytest.param(torch.float32, (6, 2), 64, None, 30.0, 3, 16, id="softcap-3-shares"),
    pytest.param(torch.float32, (4, 1), 24, 9, 20.0, 2, 5, id="mqa-window-softcap-block5"),
    pytest.param(torch.bfloat16, (8, 2), 64, 40, 50.0, 4, 16, id="bf16-window-softcap-4-shares"),
    pytest.param(torch.float16, (4, 2), 96, 33, None, 2, 16, id="fp16-dim96-window"),
])
def test_triton_decode_equals_attention_over_each_rows_own_keys(dtype, heads, dim, window, softcap, splits, block):
    hq, hkv = heads
    q, pool_k, pool_v, table, lengths = _problem(dtype, hq, hkv, dim, block, window)
    got = attention_triton.paged_decode(*(t.to(DEVICE) for t in (q, pool_k, pool_v, table, lengths)), 0.1,
                                        window, softcap, splits=splits)  # [N, Hq, D]
    want = _reference(q, pool_k, pool_v, table, lengths, 0.1, window, softcap)
    assert got.dtype == dtype and got.shape == q.shape
    tol = TOLERANCE[dtype]
    assert torch.allclose(got.cpu().float(), want, atol=tol, rtol=tol), (got.cpu().float() - want).abs().max()


def test_triton_decode_equals_the_cpu_kernel():
    if kernels.cpu() is None:
        pytest.skip("no C++ compiler here")
    q, pool_k, pool_v, table, lengths = _problem(torch.float32, 8, 2, 64, 16, window=30, seed=1)
    cpu = paged_attention.decode(q[:, :, None], pool_k, pool_v, table, lengths, None, 30, 25.0)[:, 0]
    got = attention_triton.paged_decode(*(t.to(DEVICE) for t in (q, pool_k, pool_v, table, lengths)), 64 ** -0.5,
                                        30, 25.0, splits=2)
    assert torch.allclose(got.cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_keys_are_split_in_shares_only_where_rows_leave_the_gpu_idle():
    processors = 132  # an H100 SXM's multiprocessors
    assert attention_triton.split_count(64, 8, 4096, processors) == 1  # 512 programs already
    assert attention_triton.split_count(1, 8, 4096, processors) == 16  # shares of 256 keys at the least
    assert attention_triton.split_count(1, 8, 1 << 20, processors) == attention_triton.MAX_SPLITS
    assert attention_triton.split_count(2, 8, 300, processors) == 1  # too short to share


def test_first_use_check_passes_the_kernel_and_refuses_a_wrong_or_failing_one(monkeypatch, caplog, fresh_checks):
    check = paged_attention._triton_checked
    assert check(DEVICE, torch.float32, 4, 2, 16, 24)
    assert check(DEVICE, torch.bfloat16, 8, 2, 16, 80)
    kernel = attention_triton.paged_decode
    monkeypatch.setattr(attention_triton, "paged_decode", lambda *a, splits: kernel(*a, splits=splits) + 1e-3)
    with caplog.at_level(logging.WARNING, logger=paged_attention.__name__):
        assert not check(DEVICE, torch.float32, 4, 1, 16, 24)
        assert not check(DEVICE, torch.float32, 4, 1, 16, 24)  # decided once
    assert len(caplog.records) == 1 and "difference" in caplog.text

    def fails(*args, splits):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(attention_triton, "paged_decode", fails)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=paged_attention.__name__):
        assert not check(DEVICE, torch.float32, 4, 4, 16, 24)
    assert "PTX assembly failed" in caplog.text


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: GQA, sliding windows, softcap, scaling
def test_decoding_on_the_triton_kernel_gives_the_gather_paths_logits(family, tmp_path, monkeypatch, fresh_checks):
    if DEVICE.type == "cuda":
        pytest.skip("greedy() decodes CPU models, and compiled Triton takes no CPU tensors")
    bm = served(build(family, tmp_path / family))
    kernel, launches = attention_triton.paged_decode, []

    def counted(q, *args, **kw):
        launches.append(q.shape[0])
        return kernel(q, *args, **kw)

    monkeypatch.setattr(attention_triton, "paged_decode", counted)
    monkeypatch.setattr(kernels, "on_triton", lambda t: True)  # CPU tensors too: interpreted
    tokens, logits = greedy(bm, PROMPTS)
    assert launches.count(len(PROMPTS)) == (NEW - 1) * bm.geometry.n_layers  # every decode step, every layer
    monkeypatch.setattr(paged_attention, "usable", lambda query, pool: False)
    gathered_tokens, gathered_logits = greedy(bm, PROMPTS)
    assert tokens == gathered_tokens
    assert (logits - gathered_logits).abs().max() < 1e-4
