"""The kernels: on the CPU this folder's C++ sources, built as one extension with the machine's
compiler (`cpu()`); on CUDA this folder's Triton kernels (`*_triton.py`, where `triton()` imports).

- paged_attention.cpp: decode attention straight from the paged KV cache (engine/paged_attention.py);
- lora_delta.cpp: unmerged LoRA deltas of a batch, each row by its slot (adapters/lora_delta.py);
- bottleneck_site.cpp: bottleneck adapters at one site of a decode step, each row by its slot and
  form (adapters/bottleneck_layer.py);
- small_linear.cpp: a float32 linear layer over 1-4 rows (server/linear.py, decode at low
  concurrency);
- attention_triton.py: the CUDA counterpart of paged_attention.cpp, checked once per geometry on
  first use (engine/paged_attention.py; where it fails, one warning and the gather path);
- lora_triton.py: lora_delta.cpp's counterpart on CUDA, each token by its slot, decode and prefill
  (adapters/lora_delta.py, which takes it once it has matched the stacked path on a small problem
  on the device);
- bottleneck_triton.py: bottleneck adapters' down and up projections on CUDA, each token by its
  slot, decode and prefill (adapters/bottleneck_layer.py, once it has matched F.linear on the
  device).

The C++ sources are built on first use (about a minute, then cached by torch under
~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR, named by the sources' hash: a changed source
builds anew, and checkouts of two versions on one machine do not rebuild each other's). Where they
cannot be built, `cpu()` is None, one warning is logged, and each caller takes its torch path
(gathered blocks + SDPA; stacked `bmm`; bottleneck adapters by groups). Triton compiles its kernels
at their first launch (cached by Triton).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NONE = torch.empty(0)  # what the CPU kernels take for an optional tensor that is absent (a bias)
SOURCES = sorted(str(p) for p in Path(__file__).parent.glob("*.cpp"))
# named by the sources' hash: checkouts of other versions on one machine keep their own builds
NAME = "hotswap_kernels_" + hashlib.sha256(b"".join(Path(s).read_bytes() for s in SOURCES)).hexdigest()[:12]


@functools.cache
def cpu():
    """The compiled extension, or None where it cannot be built (logged once)."""
    try:
        from torch.utils import cpp_extension  # imported here: it pulls in setuptools
        if shutil.which("ninja") is None:  # torch builds with ninja: the pip package's, when none is on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return cpp_extension.load(NAME, SOURCES, extra_ldflags=["-fopenmp"],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the torch paths serve
        log.warning("CPU kernels unavailable (%s); decode attention gathers blocks, LoRA deltas stack weights", exc)
        return None



@functools.cache
def triton():
    """The triton package, or None where it is not installed (a CPU-only torch needs none)."""
    try:
        import triton as package
    except ImportError:
        return None
    return package


def on_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like `t`: CUDA ones, with triton installed. (Tests run
    the kernels on CPU tensors under TRITON_INTERPRET=1, calling them directly.)"""
    return t.is_cuda and triton() is not None
