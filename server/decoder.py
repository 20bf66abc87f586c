"""The decoder forward pass: the model's own transformers code, over our KV cache.

The model runs as transformers wrote it (embedding scale, rotary and its scaling, q/k norms,
biases, fused projections, MoE routing, sandwich norms), with one attention implementation of
ours registered through transformers' attention interface under the name "hotswap". Each
forward passes a `Step` (the `StepShape` and the paged cache, engine/cache.py) as a keyword
argument, which transformers hands down to every attention call; `attention` writes the layer's
new k/v into the rows' blocks and attends over the rows' cached span with their mask,
honouring what the model passes it: `scaling`, GQA, `sliding_window`, `softcap`.

No mask function is registered: transformers builds no mask for an attention implementation
without one (masking_utils `_preprocess_mask_arguments` returns None), so it spends nothing on
masks we would not read; ours are built from the `StepShape` by the first attention call that
needs one, once per sliding window and forward, and none at all when the rows are aligned (a
prefill from position 0, a decode step of rows of one length: SDPA then runs its mask-free
kernels) or when a decode step attends from the blocks (engine/paged_attention.py: a C++ kernel
on the CPU, a Triton one on CUDA).

Adapter wrappers installed on the model's modules (LoRA) take effect because its modules are
called; bottleneck adapters join at the residual points of `server/residual.py`.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from server.engine import paged_attention
from server.engine.cache import KVCache, StepShape
from server.residual import PLAIN, ResidualHooks, ResidualPoints

__all__ = ["ATTENTION", "PLAIN", "Decoder", "ResidualHooks", "Step", "StepShape", "attention"]

ATTENTION = "hotswap"  # the attn_implementation name the base model is switched to
STEP = "hotswap_step"  # the forward keyword that carries the Step down to `attention`
# transformers' per-call wrappers that do nothing at inference: (wrapper function, its file)
INFERENCE_NOOPS = {("wrapped_func", "deprecation.py"),  # deprecate_kwarg: renames a kwarg we never pass
                   ("forward_with_checkpointing", "modeling_layers.py")}  # gradient checkpointing (training only)


@dataclass
class Step:
    """What one forward's attention calls share: the shape, the cache, masks built on first use
    (a decode step attended from the blocks by a kernel builds none)."""

    shape: StepShape
    cache: KVCache
    masks: dict[int | None, Tensor] = field(default_factory=dict)  # by sliding window; None: causal only

    def mask(self, sliding_window: int | None) -> Tensor | None:
        """[N, 1, L, T] bool; with a window W, key j is seen by position p iff p - W < j <= p.

        None where the mask is plain causal over T == L keys, or L == 1 and every key is seen: SDPA
        then needs none (its faster mask-free kernels; `is_causal` when L > 1)."""
        if sliding_window is None or sliding_window >= self.shape.span:
            return None if self.shape.aligned else self.causal()
        if sliding_window not in self.masks:
            recent = self._keys()[None, None, :] > self.shape.positions[:, :, None] - sliding_window  # [N, L, T]
            self.masks[sliding_window] = self.causal() & recent[:, None]
        return self.masks[sliding_window]

    def causal(self) -> Tensor:
        """[N, 1, L, T] bool: query t of row i sees key j iff j <= starts[i] + t."""
        if None not in self.masks:
            self.masks[None] = (self._keys()[None, None, :] <= self.shape.positions[:, :, None])[:, None]
        return self.masks[None]

    def _keys(self) -> Tensor:
        return torch.arange(self.shape.span, device=self.shape.positions.device)  # [T]


def attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    hotswap_step: Step | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """query: [N, Hq, L, D], key/value: [N, Hkv, L, D] -> ([N, L, Hq, D], no weights), via the cache."""
    if hotswap_step is None:
        raise ValueError(f"attn_implementation {ATTENTION!r} runs only inside Decoder.forward")
    if dropout:
        raise ValueError(f"attention dropout {dropout}: the base model must be in eval mode")
    step = hotswap_step
    shape = step.shape
    step.cache.store(module.layer_idx, shape, key, value)
    if shape.table is not None and paged_attention.usable(query, step.cache.pool):  # decode: from the blocks
        pool_k, pool_v = step.cache.layer(module.layer_idx)
        out = paged_attention.decode(query, pool_k, pool_v, shape.table, shape.lengths, scaling, sliding_window,
                                     softcap)  # [N, 1, Hq, D]
        return out, None
    keys, values = step.cache.read(module.layer_idx, shape, key, value)  # [N, Hkv, T, D]
    mask = step.mask(sliding_window)
    if softcap is not None:
        out = _softcapped(query, keys, values, step.causal() if mask is None else mask, scaling, softcap)
    else:
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=mask is None and query.shape[2] > 1, scale=scaling,
            enable_gqa=keys.shape[1] != query.shape[1],
        )  # [N, Hq, L, D]
    return out.transpose(1, 2), None


def _softcapped(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scaling: float | None,
                softcap: float) -> Tensor:
    """Attention with soft-capped scores, as transformers' eager path: cap·tanh(s/cap), softmax in fp32."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)  # [N, Hq, T, D]
    values = values.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale  # [N, Hq, L, T]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values)  # [N, Hq, L, D]


AttentionInterface.register(ATTENTION, attention)


class Decoder:
    """The base model's forward over our cache: embed ids, run the layers, project to logits."""

    def __init__(self, model: nn.Module, residual: ResidualPoints | None) -> None:
        model.set_attn_implementation(ATTENTION)
        _skip_inference_noops(model.base_model)
        self.model = model
        self.residual = residual  # None: no bottleneck adapters on this family
        # transformers' get_*_embeddings walk the model (~13 us each): resolve them once. The input
        # embedding is never wrapped (LoRA wraps Linear/Conv1D); the head is, so it is found by name.
        self.embedding = model.get_input_embeddings()
        self.head = next(name for name, m in model.named_modules() if m is model.get_output_embeddings())
        cfg = model.config
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)  # gemma2, gemma3
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # granite: logits / scaling

    def embed(self, ids: Tensor) -> Tensor:
        """ids: [..] -> [.., H], what the model's input embedding gives (any scale inside the model's
        forward, e.g. gemma2's sqrt(H), is applied there, to soft-prompt embeddings too, as in PEFT)."""
        return self.embedding(ids)

    def forward(self, x: Tensor, shape: StepShape, cache: KVCache, hooks: ResidualHooks = PLAIN) -> Tensor:
        """x: [N, L, H] input embeddings -> [N, L, H] final hidden states (after the final norm)."""
        step = Step(shape, cache)
        inner = self.model.base_model
        kwargs = {"inputs_embeds": x, "position_ids": shape.positions, "use_cache": False, STEP: step}
        if hooks is PLAIN:
            return inner(**kwargs).last_hidden_state
        if self.residual is None:
            raise ValueError(f"{self.model.config.model_type}: no residual points for bottleneck adapters")
        with self.residual.joined(inner, hooks):
            return inner(**kwargs).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, H] (from `forward`) -> [N, V] float32, through the head as the model's own forward."""
        logits = self.model.get_submodule(self.head)(hidden)
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()


def _skip_inference_noops(base_model: nn.Module) -> None:
    """Bind each submodule's forward past the INFERENCE_NOOPS wrappers around it (the decoder layers' and
    attention modules', one to three calls each per layer and step: ~10 % of a small model's decode step
    on a CPU). The base model's own forward keeps its decorators, which do work (defaults, outputs)."""
    for module in base_model.modules():
        if module is base_model:
            continue
        forward = type(module).forward
        while getattr(forward, "__wrapped__", None) is not None and _is_noop(forward):
            forward = forward.__wrapped__
        if forward is not type(module).forward:
            module.forward = types.MethodType(forward, module)


def _is_noop(function) -> bool:
    code = function.__code__
    return (code.co_name, Path(code.co_filename).name) in INFERENCE_NOOPS
