"""The Triton slot kernels (server/kernels/lora_triton.py, through TritonDelta) equal the stacked
path (ModuleDelta, the reference) per row: slots of different ranks beside rows with no delta, at
decode and prefill (rows of different adapters in one token tile), with shift, DoRA with and without
a base bias, aLoRA gates, in float32 and half precision; a row's delta does not depend on the rest
of the batch; the table points at the weights where they lie; module_delta takes the kernels only
once they check out. Without CUDA the kernels run under Triton's interpreter on CPU tensors
(tests/conftest.py) and are also compiled, not run, for sm_80/sm_90; with CUDA, run on the GPU."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")

from server import kernels  # noqa: E402
from server.adapters import lora_delta  # noqa: E402
from server.adapters.lora_delta import LoraWeights, ModuleDelta, TritonDelta, module_delta  # noqa: E402
from tests.adapters.test_lora_delta import lora_weights, shared_slots  # noqa: E402
from tests.triton_compile import assert_compiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN, OUT = 136, 144  # past one K tile and one N tile at decode (128), five at prefill (32)
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # about one rounding of the output


def _rows(dtype: torch.dtype = torch.float32) -> list[LoraWeights | None]:
    """8 rows: ranks 8 and 20 (two rank tiles), 16 with shift, 4 with shift and DoRA, two base rows."""
    gen = torch.Generator().manual_seed(0)
    plain8, plain20 = (lora_weights(gen, rank, size=(IN, OUT)) for rank in (8, 20))
    shifted = lora_weights(gen, 16, shift=True, size=(IN, OUT))
    dora = lora_weights(gen, 4, shift=True, dora=True, size=(IN, OUT))
    rows = [plain8, None, plain20, shifted, plain8, dora, None, plain20]
    return [None if w is None else w.to(DEVICE, dtype) for w in rows]


def _inputs(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [8, L, in], base_out [8, L, out], bias [out]."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, tokens, IN, generator=gen)
    bias = torch.randn(OUT, generator=gen)
    base_out = torch.randn(8, tokens, OUT, generator=gen) + bias
    return x.to(DEVICE, dtype), base_out.to(DEVICE, dtype), bias.to(DEVICE, dtype)


def _reference(rows, x, base_out, bias, gate=None, gated=False) -> torch.Tensor:
    """ModuleDelta in float32 from the same values."""
    wide = [None if w is None else w.to(DEVICE, torch.float32) for w in rows]
    return ModuleDelta.build(wide, gated).apply(x.float(), base_out.float(), None if bias is None else bias.float(), gate)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_equals_the_stacked_path_and_leaves_base_rows_alone(tokens, with_bias):
    rows = _rows()
    x, base_out, bias = _inputs(tokens, torch.float32)
    bias = bias if with_bias else None
    got = TritonDelta.build(rows).apply(x, base_out.clone(), bias)
    torch.testing.assert_close(got, _reference(rows, x, base_out, bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[[1, 6]], base_out[[1, 6]])  # rows with no delta are not touched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_half_precision_is_the_float32_result_rounded(dtype, tokens):
    rows = _rows(dtype)
    x, base_out, bias = _inputs(tokens, dtype)
    got = TritonDelta.build(rows).apply(x, base_out.clone(), bias)
    assert got.dtype == dtype
    want = _reference(rows, x, base_out, bias)
    tol = HALF_TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_gate_leaves_tokens_before_an_invocation_as_the_base_computed_them():
    rows = _rows()
    x, base_out, bias = _inputs(5, torch.float32)
    gate = torch.ones(8, 5, 1, dtype=torch.bool, device=DEVICE)  # [N, L, 1]
    gate[2, :3] = False  # row 2's invocation at its 4th token, mid-tile
    gate[5] = False  # row 5 (DoRA) not invoked yet
    got = TritonDelta.build(rows, gated=True).apply(x, base_out.clone(), bias, gate)
    torch.testing.assert_close(got, _reference(rows, x, base_out, bias, gate, gated=True), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2, :3], base_out[2, :3]) and torch.equal(got[5], base_out[5])
    assert not torch.equal(got[2, 3:], base_out[2, 3:])


@pytest.mark.parametrize("tokens", [1, 5])
def test_a_rows_delta_is_the_same_bits_alone_and_in_any_batch(tokens):
    rows = _rows()
    x, base_out, bias = _inputs(tokens, torch.float32)
    batch = TritonDelta.build(rows).apply(x, base_out.clone(), bias)
    for i in (0, 3, 5, 7):
        alone = TritonDelta.build([rows[i]]).apply(x[i : i + 1], base_out[i : i + 1].clone(), bias)
        assert torch.equal(alone[0], batch[i])


def test_the_table_reads_the_weights_where_they_lie():
    rows = _rows()
    x, base_out, bias = _inputs(1, torch.float32)
    delta = TritonDelta.build(rows)
    rows[2].A.mul_(3.0)  # after the table was built: the kernel must see it (no copy was taken)
    got = delta.apply(x, base_out.clone(), bias)
    torch.testing.assert_close(got, _reference(rows, x, base_out, bias), atol=1e-5, rtol=1e-5)


@pytest.fixture
def on_triton(monkeypatch):
    """module_delta as on CUDA, for these CPU tensors; the first-use check run afresh."""
    monkeypatch.setattr(kernels, "on_triton", lambda t: True)
    lora_delta.triton_serves.cache_clear()
    yield
    lora_delta.triton_serves.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_delta_takes_the_kernels_once_they_check_out(on_triton, dtype):
    assert isinstance(module_delta(_rows(dtype)), TritonDelta)
    assert lora_delta.triton_serves(torch.device(DEVICE), dtype)


def _raises(*args):
    raise RuntimeError("no such kernel")


def _does_nothing(*args):
    return None


@pytest.mark.parametrize(("kernel", "says"), [(_raises, "unavailable"), (_does_nothing, "differ")])
def test_kernels_that_fail_the_check_leave_the_stacked_path_with_one_warning(on_triton, monkeypatch, caplog,
                                                                              kernel, says):
    from server.kernels import lora_triton
    monkeypatch.setattr(lora_triton, "lora_delta", kernel)
    with caplog.at_level(logging.WARNING, logger=lora_delta.__name__):
        deltas = [module_delta(_rows()) for _ in range(3)]
    assert all(isinstance(d, ModuleDelta) for d in deltas)
    assert len(caplog.records) == 1 and says in caplog.records[0].message


# Run without TRITON_INTERPRET: the kernels as the GPU compiler sees them, every launch's variant.
COMPILE = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from server.kernels import lora_triton as k

def signature(kernel, dtype, constexprs):
    pointers = {"x_ptr": dtype, "out_ptr": dtype, "bias_ptr": dtype, "slot_ptr": "i32", "table_ptr": "i64"}
    return {name: "constexpr" if name in constexprs else "*" + pointers.get(name, "fp32") if name.endswith("_ptr")
            else "i32" for name in kernel.arg_names}

tilings, biases = (k.DECODE, k.PREFILL), (True, False)
for arch, dtype, (m, r, kk, n), bias in itertools.product((80, 90), ("fp32", "bf16"), tilings, biases):
    launches = [(k._expand, {"HAS_BIAS": bias, "BLOCK_M": m, "BLOCK_R": r, "BLOCK_N": n})]
    if bias:  # _shrink has no bias: once per tiling
        launches.append((k._shrink, {"BLOCK_M": m, "BLOCK_R": r, "BLOCK_K": kk}))
    for kernel, constexprs in launches:
        src = ASTSource(kernel, signature(kernel, dtype, constexprs), constexprs=constexprs)
        assert triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"], (kernel, arch, dtype, m)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, the tests above compile and run the kernels")
def test_the_kernels_compile_for_real_gpus_here(tmp_path):
    """What the interpreter accepts, a GPU compile may reject: each launch's kernel, compiled to a
    cubin for sm_80 and sm_90 (Triton's own ptxas, no GPU needed), in float32 and bfloat16."""
    assert_compiles(COMPILE, tmp_path)


@pytest.mark.parametrize("tokens", [1, 5])
def test_rows_whose_adapter_has_no_lora_at_a_module_stay_as_they_were(tokens):
    """The modules of a batch share its slots: a slot of rank 0 (its adapter has no LoRA here) adds nothing."""
    slots, by_slot, at_m2 = shared_slots((IN, OUT), DEVICE)
    deltas = TritonDelta.build_all(slots, by_slot, set())
    assert deltas["m1"].slot_of_row is deltas["m2"].slot_of_row
    x, base_out, bias = (t[:5] if t.dim() > 1 else t for t in _inputs(tokens, torch.float32))
    got = deltas["m2"].apply(x, base_out.clone(), bias)
    assert torch.equal(got[[0, 1, 3]], base_out[[0, 1, 3]])
    torch.testing.assert_close(got, _reference(at_m2, x, base_out, bias), atol=1e-5, rtol=1e-5)
