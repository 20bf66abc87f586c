"""nn.Linear on the CPU in float32: a C++ kernel over 1-4 rows, oneDNN's matmul from there on.

oneDNN is 1.2-1.3x faster than MKL's sgemm for decode shapes: on the 2-core AMD EPYC dev machine
(hidden 768, 8 rows), thirty [3072, 768] weights take 37 ms through `F.linear` (MKL) and 29.5 ms
through `torch.ops.mkldnn._linear_pointwise` on the same dense weights. Over 1-4 rows (decode at
low concurrency) oneDNN streams the weights well below the memory's speed, and
server/kernels/small_linear.cpp 1.27-1.36x faster (the bench model's 84 linears, BENCHMARKS.md
"Small linears"); from 8 rows on oneDNN is as fast or faster. The weights stay ordinary dense Parameters, so LoRA merges and
restores (in place) need nothing extra. Elsewhere (CUDA, other dtypes, a torch built without
oneDNN) the module is a plain nn.Linear; without the C++ kernels, oneDNN takes every row count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server import kernels

SMALL_ROWS = 4  # up to this many rows, small_linear.cpp


class OneDnnLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if not (x.is_cpu and x.dtype == torch.float32):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if 0 < rows <= SMALL_ROWS and self.weight.is_contiguous() and (built := kernels.cpu()) is not None:
            flat = x.reshape(rows, x.shape[-1]).contiguous()  # [M, K]
            bias = kernels.NONE if self.bias is None else self.bias
            return built.small_linear(flat, self.weight, bias).view(*x.shape[:-1], self.out_features)  # [..., N]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linears(model: nn.Module) -> int:
    """Switch every nn.Linear of a CPU fp32 model to OneDnnLinear, in place; returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            count += 1
    return count
