"""Shared training loop pieces: seeding, the LR schedule, bf16 autocast steps, perplexity."""
from __future__ import annotations

import math
import random
import time

import torch

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}


def seed_everything(seed: int, threads: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batches(windows: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of windows: [batch_size, length], a fresh permutation each epoch."""
    while True:
        order = torch.randperm(len(windows), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]


def loss_of(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Mean next-token NLL over the batch; input_ids [batch, length]."""
    with torch.autocast(**AUTOCAST):
        return model(input_ids=input_ids, labels=input_ids, **kwargs).loss


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, **kwargs) -> float:
    """exp(mean NLL) over every predicted token of windows [n, length], in fp32."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        loss = model(input_ids=chunk, labels=chunk, **kwargs).loss
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total, count = total + loss.item() * n, count + n
    model.train()
    return math.exp(total / count)


def fit(model, params: list, windows: torch.Tensor, generator: torch.Generator, *, steps: int, batch_size: int,
        lr: float, warmup: int, log_every: int = 25, on_step=None) -> float:
    """AdamW over `params` on shuffled batches of windows [n, length]; returns the last loss.

    `on_step(step)` runs after each optimizer step (evaluations); gradients are clipped at 1.0.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, stream = time.perf_counter(), batches(windows, batch_size, generator)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_of(model, next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            tokens = (step + 1) * windows.shape[1] * batch_size
            print(f"step {step + 1} loss {loss.item():.3f} {tokens / elapsed:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if on_step is not None:
            on_step(step + 1)
    return loss.item()
