"""Compile Triton kernels for real GPUs without one: what the interpreter accepts, a GPU compile may
reject. A script run without TRITON_INTERPRET compiles each launch's variant to cubins (Triton's own
ptxas) and prints "compiled"."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def assert_compiles(script: str, cache: Path) -> None:
    """Run `script` in a fresh interpreter, Triton's cache in `cache`; skip where triton has no NVIDIA backend."""
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
