"""Time spent in adapter computation during a decode step, per kind.

On CPU every step is measured with perf_counter around each adapter region (two clock
reads per region). On CUDA only every `cuda_every`-th step is measured, with CUDA events
read after one synchronisation at the end of the step, so the hot path never waits.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class AdapterClock:
    def __init__(self, device: torch.device, cuda_every: int = 32) -> None:
        self.cuda = device.type == "cuda"
        self.every = cuda_every if self.cuda else 1
        self._step = 0
        self.active = False
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def begin_step(self) -> bool:
        """Whether this step is measured."""
        self._step += 1
        self.active = self._step % self.every == 0
        self._seconds.clear()
        self._events.clear()
        return self.active

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((kind, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[kind] += time.perf_counter() - t0

    def end_step(self) -> dict[str, float]:
        """Seconds per kind for a measured step."""
        if self._events:
            torch.cuda.synchronize()
            for kind, start, end in self._events:
                self._seconds[kind] += start.elapsed_time(end) / 1000.0
        self.active = False
        return dict(self._seconds)


class TimedHooks:
    """Residual hooks measured as the `bottleneck` kind."""

    def __init__(self, hooks, clock: AdapterClock) -> None:
        self.hooks = hooks
        self.clock = clock

    def after_attention(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        with self.clock.measure("bottleneck"):
            return self.hooks.after_attention(layer, h, x)

    def after_ffn(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        with self.clock.measure("bottleneck"):
            return self.hooks.after_ffn(layer, h, x)
