"""A module's per-row LoRA delta: the CPU slot kernel and the stacked `bmm` path both equal the
formula of lora_layer.py per row, for plain, bias-shift, DoRA and aLoRA-gated rows of different
ranks beside rows with no delta; a row's delta by slot does not depend on the rest of the batch."""
from __future__ import annotations

import pytest
import torch

from server import kernels
from server.adapters.lora_delta import LoraWeights, ModuleDelta, SlotDelta, module_delta, slot_deltas

IN, OUT = 48, 40

needs_kernel = pytest.mark.skipif(kernels.cpu() is None, reason="no C++ compiler here: the stacked path serves")


def lora_weights(gen: torch.Generator, rank: int, shift: bool = False, dora: bool = False,
                 size: tuple[int, int] = (IN, OUT)) -> LoraWeights:
    """Seeded weights of one module, in -> out = `size`, s = 2 / rank."""
    n_in, n_out = size

    def rand(*shape):
        return torch.randn(*shape, generator=gen)
    return LoraWeights(rand(rank, n_in), rand(n_out, rank) * 0.1, 2.0 / rank,
                       dora_scale=rand(n_out).abs() + 0.5 if dora else None,
                       shift=rand(n_out) * 0.1 if shift else None)


def _rows(dtype: torch.dtype = torch.float32) -> list[LoraWeights | None]:
    gen = torch.Generator().manual_seed(0)
    plain8, plain32 = lora_weights(gen, 8), lora_weights(gen, 32)
    shifted, dora = lora_weights(gen, 16, shift=True), lora_weights(gen, 4, shift=True, dora=True)
    rows = [plain8, None, plain32, shifted, plain8, dora, None, plain32]
    return [None if w is None else w.to("cpu", dtype) for w in rows]


def _expected(x: torch.Tensor, base_out: torch.Tensor, bias: torch.Tensor, rows) -> torch.Tensor:
    """lora_layer.py's formula per row, in float64. x: [N, L, in], base_out: [N, L, out] -> [N, L, out]."""
    out = base_out.double().clone()
    for i, w in enumerate(rows):
        if w is None:
            continue
        delta = w.scale * (x[i].double() @ w.A.double().T @ w.B.double().T)  # [L, out]
        if w.dora_scale is not None:
            g = w.dora_scale.double()
            delta = (g - 1) * (base_out[i].double() - bias.double()) + g * delta
        if w.shift is not None:
            delta = delta + w.shift.double()
        out[i] += delta
    return out


def _inputs(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, tokens, IN, generator=gen).to(dtype)
    bias = torch.randn(OUT, generator=gen).to(dtype)
    return x, (torch.randn(8, tokens, OUT, generator=gen) + bias).to(dtype), bias


@needs_kernel
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_slot_kernel_equals_the_formula_per_row(dtype, tol):
    rows = _rows(dtype)
    x, base_out, bias = _inputs(1, dtype)
    delta = module_delta(rows)
    assert isinstance(delta, SlotDelta)
    got = delta.apply(x, base_out.clone(), bias)
    assert torch.allclose(got.double(), _expected(x, base_out, bias, rows), atol=tol, rtol=tol)
    untouched = [i for i, w in enumerate(rows) if w is None]
    assert torch.equal(got[untouched], base_out[untouched])  # rows with no delta are not touched


def test_stacked_path_equals_the_formula_per_row():
    rows = _rows()
    for tokens in (1, 5):
        x, base_out, bias = _inputs(tokens, torch.float32)
        got = ModuleDelta.build(rows).apply(x, base_out.clone(), bias)
        assert torch.allclose(got.double(), _expected(x, base_out, bias, rows), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_slot_delta_of_several_tokens_per_row_takes_the_stacked_path():
    rows = _rows()
    x, base_out, bias = _inputs(5, torch.float32)
    got = module_delta(rows).apply(x, base_out.clone(), bias)
    assert torch.equal(got, ModuleDelta.build(rows).apply(x, base_out.clone(), bias))


@needs_kernel
def test_gate_leaves_rows_before_their_invocation_as_the_base_computed_them():
    rows = _rows()
    x, base_out, bias = _inputs(1, torch.float32)
    gate = torch.tensor([True, True, False, True, False, True, True, True])[:, None, None]  # [N, 1, 1]
    got = module_delta(rows, gated=True).apply(x, base_out.clone(), bias, gate)
    off = [2, 4]
    assert torch.equal(got[off], base_out[off])
    on = [i for i in range(8) if i not in off]
    want = _expected(x, base_out, bias, rows)
    assert torch.allclose(got[on].double(), want[on], atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_rows_delta_by_slot_is_the_same_bits_alone_and_in_any_batch():
    rows = _rows()
    x, base_out, bias = _inputs(1, torch.float32)
    batch = module_delta(rows).apply(x, base_out.clone(), bias)
    for i in (0, 3, 5):
        alone = module_delta([rows[i]]).apply(x[i : i + 1], base_out[i : i + 1].clone(), bias)
        assert torch.equal(alone[0], batch[i])


def _bf16_exact(w: LoraWeights) -> LoraWeights:
    """The same module with A and B rounded to bfloat16's values, kept in float32 (a bfloat16-saved LoRA)."""
    return LoraWeights(w.A.bfloat16().float(), w.B.bfloat16().float(), w.scale, w.dora_scale, shift=w.shift)


@needs_kernel
def test_weights_bfloat16_holds_are_read_at_half_width_to_the_formula_and_alone_as_in_a_batch():
    """Rows of bfloat16-exact adapters (plain, shift, DoRA) beside float32 ones: the kernel reads the
    former's bfloat16 copies, to the formula's values (the sums are float32 as from float32 weights,
    their vector blocking the compiler's), and a row's delta is the same bits alone and in the batch."""
    wide = [None if w is None else _bf16_exact(w) if i % 2 == 0 or w.dora_scale is not None else w
            for i, w in enumerate(_rows())]
    narrow = [None if w is None else w.to("cpu", torch.float32) for w in wide]
    assert [w is not None and w.narrow_A is not None for w in narrow] == [True, False, True, False, True, True,
                                                                         False, False]
    x, base_out, bias = _inputs(1, torch.float32)
    got = module_delta(narrow).apply(x, base_out.clone(), bias)
    torch.testing.assert_close(got.double(), _expected(x, base_out, bias, wide), atol=1e-5, rtol=1e-5)
    for i in (0, 3, 5):
        alone = module_delta([narrow[i]]).apply(x[i : i + 1], base_out[i : i + 1].clone(), bias)
        assert torch.equal(alone[0], got[i])
    assert narrow[0].narrow_Bt.shape == (8, OUT) and narrow[0].narrow_Bt.dtype == torch.bfloat16
    assert {id(narrow[0].narrow_A), id(narrow[0].narrow_Bt)} <= {id(t) for t in narrow[0].tensors()}  # in size_bytes


def test_weights_bfloat16_does_not_hold_or_not_float32_get_no_copies():
    gen = torch.Generator().manual_seed(4)
    w = lora_weights(gen, 8)
    assert w.to("cpu", torch.float32).narrow_A is None  # float32 values bfloat16 would round
    assert _bf16_exact(w).to("cpu", torch.bfloat16).narrow_A is None  # already that wide
    assert _bf16_exact(w).to("cpu", torch.float64).narrow_A is None


def shared_slots(size: tuple[int, int] = (IN, OUT), device: str = "cpu"):
    """A batch over two modules: adapter 0 targets m1 only, adapter 1 both; rows [0, base, 1, 0, 1].
    -> (slots, by_slot, each row's weights at m2)."""
    gen = torch.Generator().manual_seed(2)
    w01, w11, w12 = (lora_weights(gen, rank, size=size).to(device, torch.float32) for rank in (8, 16, 4))
    slots = [0, -1, 1, 0, 1]
    return slots, {"m1": [w01, w11], "m2": [None, w12]}, [None, None, w12, None, w12]


@needs_kernel
def test_modules_of_a_batch_share_its_slots_and_rows_without_lora_there_stay_as_they_were():
    slots, by_slot, at_m2 = shared_slots()
    deltas = slot_deltas(slots, by_slot)
    assert deltas["m1"].slot_of_row is deltas["m2"].slot_of_row
    x, base_out, bias = _inputs(1, torch.float32)
    x, base_out = x[:5], base_out[:5]
    got = deltas["m2"].apply(x, base_out.clone(), bias)
    assert torch.equal(got[[0, 1, 3]], base_out[[0, 1, 3]])  # adapter 0 has no LoRA at m2: no delta
    torch.testing.assert_close(got.double(), _expected(x, base_out, bias, at_m2), atol=1e-5, rtol=1e-5)


def test_a_batch_with_weights_the_kernel_cannot_read_is_stacked():
    """One module's weights with a strided shift beside plain ones: the kernels read vectors densely,
    so the batch's delta stacks (and equals the formula)."""
    gen = torch.Generator().manual_seed(3)
    plain, strided = lora_weights(gen, 8), lora_weights(gen, 4)
    strided = LoraWeights(strided.A, strided.B, strided.scale, shift=torch.randn(2 * OUT, generator=gen)[::2])
    rows = [plain, strided, None, plain, strided, None, plain, strided]
    delta = module_delta(rows)
    assert isinstance(delta, ModuleDelta)
    x, base_out, bias = _inputs(1, torch.float32)
    torch.testing.assert_close(delta.apply(x, base_out.clone(), bias).double(), _expected(x, base_out, bias, rows),
                               atol=1e-5, rtol=1e-5)
