"""Bottleneck adapters by form on CUDA (FormSite, server/kernels/bottleneck_triton.py): the slot
kernel equals F.linear per token (slots of different widths beside rows with none, decode and
prefill tilings, float32 and bfloat16); the hooks by form equal each adapter's own GEMMs for every
option form, at decode and prefill, with base rows exactly `x + h`; a row's result does not depend
on the rest of the batch; the hooks take the kernel only once it checks out. Without CUDA the kernel
runs under Triton's interpreter on CPU tensors (tests/conftest.py), with the hooks told they are on
Triton and the CPU kernels hidden; it is also compiled, not run, for sm_80/sm_90."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from server.adapters import bottleneck_layer  # noqa: E402
from server.adapters.bottleneck_layer import BottleneckHooks, FormSite, triton_serves  # noqa: E402
from server.kernels.bottleneck_triton import slot_linear  # noqa: E402
from tests.adapters.test_bottleneck import (  # noqa: E402,F401 - llama: the fixture
    assert_each_row_is_its_adapters,
    assert_rows_round_as_their_adapters,
    half_adapters,
    llama,
    option_adapters,
)
from tests.triton_compile import assert_compiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two slots: 20 outputs of 70 inputs (row-major), 72 (past two decode N tiles) of 136 (past two
    K tiles; column-major, as the CPU keeps up.weight)."""
    gen = torch.Generator().manual_seed(0)
    row_major = torch.randn(20, 70, generator=gen)
    column_major = torch.randn(136, 72, generator=gen).T
    return [(w.to(DEVICE, dtype), torch.randn(w.shape[0], generator=gen).to(DEVICE, dtype))
            for w in (row_major, column_major)]


def _table(weights) -> torch.Tensor:
    return torch.tensor([[w.data_ptr(), b.data_ptr(), *w.shape, *w.stride()] for w, b in weights], dtype=torch.long,
                        device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_slot_linear_is_each_tokens_own_projection(dtype, tokens):
    weights = _weights(dtype)
    slots = torch.tensor([1, -1, 0, 1, -1, 0], dtype=torch.int32, device=DEVICE).repeat_interleave(tokens)
    x = torch.randn(len(slots), 140, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = torch.full((len(slots), 80), 7.0, dtype=dtype, device=DEVICE)
    slot_linear(x, out, slots, _table(weights), tokens)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for t, k in enumerate(slots.tolist()):
        if k < 0:
            assert (out[t] == 7).all(), t
            continue
        w, b = weights[k]
        n_out, n_in = w.shape
        want = F.linear(x[t, :n_in].float(), w.float(), b.float())  # [n_out]
        assert torch.allclose(out[t, :n_out].float(), want, atol=tolerance, rtol=tolerance), (t, k)
        assert (out[t, n_out:] == 7).all(), t  # past the slot's width: untouched


def test_slot_linear_refuses_strided_inputs():
    weights = _weights(torch.float32)
    x = torch.randn(140, 4, device=DEVICE).T  # [4, 140], not contiguous
    with pytest.raises(ValueError, match="x must be contiguous"):
        slot_linear(x, torch.zeros(4, 80, device=DEVICE), torch.zeros(4, dtype=torch.int32, device=DEVICE),
                    _table(weights), 1)


@pytest.fixture
def on_triton(monkeypatch):
    """The hooks see these tensors as Triton's (on CUDA they are), and no CPU kernels."""
    monkeypatch.setattr(bottleneck_layer.kernels, "on_triton", lambda t: True)
    monkeypatch.setattr(bottleneck_layer.kernels, "cpu", lambda: None)


def _counting(monkeypatch) -> list[int]:
    """Count the FormSite calls (one per form and site)."""
    calls = []
    residual = FormSite.residual
    monkeypatch.setattr(FormSite, "residual", lambda self, h, x: calls.append(1) or residual(self, h, x))
    return calls


def _adapters(tmp_path, llama):
    return [a.to(DEVICE, torch.float32) for a in option_adapters(tmp_path, llama)]


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("batch", [[0, None, 1, 4, 2, 3, None, 0, 1], [4, None, 0, 0]],
                         ids=["every form", "one form and activation"])
def test_hooks_by_form_match_each_adapter_alone(llama, tmp_path, on_triton, monkeypatch, tokens, batch):
    adapters = _adapters(tmp_path, llama)
    rows = [None if i is None else adapters[i] for i in batch]
    g = torch.Generator().manual_seed(0)
    h, x = (torch.randn(len(rows), tokens, 256, generator=g).to(DEVICE) for _ in range(2))
    calls = _counting(monkeypatch)
    assert_each_row_is_its_adapters(rows, h, x)
    assert calls


@pytest.mark.parametrize("tokens", [1, 3])
def test_hooks_by_form_in_half_precision_round_as_torch(llama, tmp_path, on_triton, monkeypatch, tokens):
    """float16 only here: Triton's interpreter truncates float32 to bfloat16 where a GPU rounds."""
    adapters = [a.to(DEVICE, torch.float16) for a in half_adapters(tmp_path, llama, torch.float16)]
    rows = [adapters[0], None, adapters[1], adapters[2], adapters[3], adapters[4], adapters[5], None]
    g = torch.Generator().manual_seed(0)
    h, x = (torch.randn(len(rows), tokens, 256, generator=g).to(DEVICE, torch.float16) for _ in range(2))
    calls = _counting(monkeypatch)
    assert_rows_round_as_their_adapters(rows, h, x)
    assert calls


def test_a_row_by_form_is_the_same_bits_whatever_the_batch(llama, tmp_path, on_triton):
    adapters = _adapters(tmp_path, llama)
    g = torch.Generator().manual_seed(1)
    h, x = (torch.randn(6, 2, 256, generator=g).to(DEVICE) for _ in range(2))
    rows = [adapters[0], adapters[4], None, adapters[2], adapters[0], adapters[1]]
    mixed = BottleneckHooks.build(rows).after_ffn(1, h, x)
    for i, adapter in enumerate(rows):
        if adapter is not None:
            alone = BottleneckHooks.build([adapter]).after_ffn(1, h[i:i + 1], x[i:i + 1])
            assert torch.equal(mixed[i], alone[0]), i


def test_the_tables_point_at_the_weights_where_they_lie(llama, tmp_path, on_triton):
    adapters = _adapters(tmp_path, llama)
    site = ("output", 0)
    form = FormSite.build(site, [adapters[0], adapters[4], adapters[0]])
    assert form.slot_of_row.tolist() == [0, 1, 0]
    for k, adapter in enumerate((adapters[0], adapters[4])):
        p = adapter.sites[site]
        for name, table in (("down", form.down), ("up", form.up)):
            weight = p[f"{name}.weight"]
            assert table[k].tolist() == [weight.data_ptr(), p[f"{name}.bias"].data_ptr(), *weight.shape, *weight.stride()]


def test_the_kernel_checks_out_here():
    triton_serves.cache_clear()
    assert triton_serves(torch.device(DEVICE), torch.float32)


def test_a_kernel_that_fails_the_check_leaves_the_groups_with_one_warning(llama, tmp_path, on_triton, monkeypatch,
                                                                          caplog):
    from server.kernels import bottleneck_triton

    def wrong(x, out, slots, table, tokens):
        out.fill_(1.0)
    monkeypatch.setattr(bottleneck_triton, "slot_linear", wrong)
    triton_serves.cache_clear()
    adapters = _adapters(tmp_path, llama)
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=bottleneck_layer.__name__):
        rows = [adapters[0], adapters[1], None]
        hooks = BottleneckHooks.build(rows)
        h, x = torch.randn(3, 1, 256, device=DEVICE), torch.randn(3, 1, 256, device=DEVICE)
        out = hooks.after_ffn(0, h, x)
    triton_serves.cache_clear()
    assert not calls
    assert torch.allclose(out[0], adapters[0].residual(("output", 0), h[:1], x[:1])[0])
    assert len(caplog.records) == 1 and "differs from F.linear" in caplog.records[0].message


# Run without TRITON_INTERPRET: the kernel as the GPU compiler sees it, each launch's variant.
COMPILE = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from server.kernels import bottleneck_triton as k

kernel = k._linear
for arch, dtype, (m, n, kk) in itertools.product((80, 90), ("fp32", "bf16"), (k.DECODE, k.PREFILL)):
    constexprs = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": kk}
    pointers = {"x_ptr": "*" + dtype, "out_ptr": "*" + dtype, "slot_ptr": "*i32", "table_ptr": "*i64"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}
    src = ASTSource(kernel, signature, constexprs=constexprs)
    assert triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"], (arch, dtype, m)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, the tests above compile and run the kernel")
def test_the_kernel_compiles_for_real_gpus_here(tmp_path):
    """What the interpreter accepts, a GPU compile may reject: the kernel compiled to a cubin for
    sm_80 and sm_90 (Triton's own ptxas, no GPU needed), in float32 and bfloat16, both tilings."""
    assert_compiles(COMPILE, tmp_path)
