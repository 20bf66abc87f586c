"""The CPU float32 linear layer (server/linear.py): over 1-4 rows the C++ kernel
(kernels/small_linear.cpp), from 5 rows oneDNN, both equal to x Wᵀ + b to float32 rounding, any
leading shape, with and without bias; a row's result over few rows does not depend on the others;
the kernel refuses what it cannot read."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from server import kernels, linear
from server.linear import SMALL_ROWS, OneDnnLinear

pytestmark = pytest.mark.skipif(kernels.cpu() is None, reason="no C++ compiler here: oneDNN takes every row count")
IN, OUT = 771, 262  # not multiples of the kernel's 4 outputs a pass or of a vector's 16 lanes


class CountingKernels:
    """The CPU kernels, counting small_linear calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.built = kernels.cpu()

    def small_linear(self, *args) -> torch.Tensor:
        self.calls += 1
        return self.built.small_linear(*args)


def _layer(bias: bool) -> OneDnnLinear:
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT, bias=bias)
    layer.__class__ = OneDnnLinear
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, by_kernel", [((1, IN), True), ((3, 1, IN), True), ((2, 2, IN), True),
                                              ((1, 5, IN), False), ((8, 1, IN), False)])
def test_equals_x_times_w_transposed_plus_b(monkeypatch, bias, shape, by_kernel):
    layer = _layer(bias)
    counting = CountingKernels()
    monkeypatch.setattr(linear.kernels, "cpu", lambda: counting)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    got = layer(x)
    want = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    assert got.shape == (*shape[:-1], OUT) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert counting.calls == (1 if by_kernel else 0)


def test_a_row_is_the_same_bits_among_any_few_rows():
    layer = _layer(True)
    x = torch.randn(SMALL_ROWS, IN, generator=torch.Generator().manual_seed(2))
    alone = [layer(x[i : i + 1]) for i in range(SMALL_ROWS)]
    for rows in range(2, SMALL_ROWS + 1):
        together = layer(x[:rows])
        for i in range(rows):
            assert torch.equal(together[i], alone[i][0]), (rows, i)


def test_reads_the_weight_as_it_is_now():
    """A LoRA merge changes the weight in place: the next call sees it."""
    layer = _layer(False)
    x = torch.randn(1, IN)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.allclose(layer(x), 2 * before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x, weight, says", [
    (torch.randn(5, 8), torch.randn(3, 8), "1 to 4 rows"),
    (torch.randn(8, 2).T, torch.randn(3, 8), "contiguous"),
    (torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), "float32"),
    (torch.randn(2, 7), torch.randn(3, 8), "x \\[M, K\\], weight \\[N, K\\]"),
])
def test_the_kernel_refuses_what_it_cannot_read(x, weight, says):
    with pytest.raises(RuntimeError, match=says):
        kernels.cpu().small_linear(x, weight, torch.empty(0))
