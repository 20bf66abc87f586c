"""The decoder forward pass over our own KV cache, for Llama- and GPT-2-style models.

The Hugging Face modules (linears, norms, MLPs, rotary embedding) are called as they
are, so adapter wrappers installed on them take effect; attention, the KV cache and
positions are ours, which is what lets rows of different lengths and adapters share
one batch. Bottleneck adapters plug in at the two residual points of each layer
through `ResidualHooks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.engine.cache import KVCache


class ResidualHooks(Protocol):
    """Where serial adapters join the residual stream (h: sub-block output, x: its input)."""

    def after_attention(self, layer: int, h: Tensor, x: Tensor) -> Tensor: ...

    def after_ffn(self, layer: int, h: Tensor, x: Tensor) -> Tensor: ...


class PlainResidual:
    """The base model's residual: `x + h` at both points."""

    def after_attention(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        return x + h

    def after_ffn(self, layer: int, h: Tensor, x: Tensor) -> Tensor:
        return x + h


PLAIN = PlainResidual()


@dataclass(frozen=True)
class StepShape:
    """Where a forward call reads and writes: rows [row0, row0+N) of the cache.

    Row i already holds `starts[i]` cached positions; its L new tokens go to
    positions starts[i] .. starts[i]+L-1 (trailing ones may be padding).
    """

    row0: int
    starts: Tensor  # [N] long
    positions: Tensor  # [N, L] long
    mask: Tensor  # [N, 1, L, T] bool: query t of row i sees key j iff j <= starts[i] + t
    span: int  # T: keys attended (max over rows of starts + L)

    @staticmethod
    def build(row0: int, starts: list[int], length: int, device: torch.device) -> "StepShape":
        start_t = torch.tensor(starts, dtype=torch.long, device=device)  # [N]
        offsets = torch.arange(length, device=device)  # [L]
        positions = start_t[:, None] + offsets[None, :]  # [N, L]
        span = max(starts) + length
        keys = torch.arange(span, device=device)  # [T]
        mask = keys[None, None, :] <= positions[:, :, None]  # [N, L, T]
        return StepShape(row0, start_t, positions, mask[:, None], span)


class Decoder:
    """The forward pass of one architecture family; `forward` is shared, the parts differ."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def embed(self, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, shape: StepShape, cache: KVCache, hooks: ResidualHooks = PLAIN) -> Tensor:
        """x: [N, L, H] input embeddings -> [N, L, H] final hidden states (before the last norm)."""
        x = self.add_positions(x, shape)
        extra = self.position_extras(x, shape)
        for i, layer in enumerate(self.layers()):
            h = self.attention(i, layer, self.attn_norm(layer)(x), shape, cache, extra)
            x = hooks.after_attention(i, h, x)
            h = layer.mlp(self.ffn_norm(layer)(x))
            x = hooks.after_ffn(i, h, x)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, H] -> [N, V] (float32)."""
        return self.model.lm_head(self.final_norm(hidden)).float()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, shape: StepShape, cache: KVCache) -> Tensor:
        """q: [N, Hq, L, D], k/v: [N, Hkv, L, D] -> [N, L, Hq*D], via the cache."""
        keys, values = cache.write(layer, shape.row0, shape.starts, k, v, shape.span)  # [N, Hkv, T, D]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=shape.mask, scale=self.scale, enable_gqa=keys.shape[1] != q.shape[1]
        )  # [N, Hq, L, D]
        n, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(n, length, -1)

    # the parts each family supplies
    scale: float

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def add_positions(self, x: Tensor, shape: StepShape) -> Tensor:
        return x

    def position_extras(self, x: Tensor, shape: StepShape) -> object:
        return None

    def attn_norm(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def final_norm(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def attention(self, i: int, layer: nn.Module, x: Tensor, shape: StepShape, cache: KVCache, extra: object) -> Tensor:
        raise NotImplementedError


class LlamaDecoder(Decoder):
    """Llama, Mistral, Qwen2 and kin: RMSNorm, rotary positions, GQA, gated MLP."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.model.embed_tokens(ids)

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def position_extras(self, x: Tensor, shape: StepShape) -> tuple[Tensor, Tensor]:
        return self.model.model.rotary_emb(x, shape.positions)  # cos, sin: [N, L, D]

    def attn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.model.norm(hidden)

    def attention(self, i: int, layer: nn.Module, x: Tensor, shape: StepShape, cache: KVCache, extra: object) -> Tensor:
        attn = layer.self_attn
        n, length, _ = x.shape
        q = attn.q_proj(x).view(n, length, -1, self.head_dim).transpose(1, 2)  # [N, Hq, L, D]
        k = attn.k_proj(x).view(n, length, -1, self.head_dim).transpose(1, 2)  # [N, Hkv, L, D]
        v = attn.v_proj(x).view(n, length, -1, self.head_dim).transpose(1, 2)  # [N, Hkv, L, D]
        cos, sin = extra
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return attn.o_proj(self.attend(i, q, k, v, shape, cache))


class Gpt2Decoder(Decoder):
    """GPT-2: LayerNorm, learned absolute positions, fused Conv1D qkv."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.n_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.transformer.wte(ids)

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def add_positions(self, x: Tensor, shape: StepShape) -> Tensor:
        return x + self.model.transformer.wpe(shape.positions)

    def attn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.ln_1

    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.ln_2

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.transformer.ln_f(hidden)

    def attention(self, i: int, layer: nn.Module, x: Tensor, shape: StepShape, cache: KVCache, extra: object) -> Tensor:
        attn = layer.attn
        n, length, hidden = x.shape
        qkv = attn.c_attn(x).view(n, length, 3, self.n_heads, self.head_dim)  # [N, L, 3, H, D]
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # each [N, H, L, D]
        return attn.c_proj(self.attend(i, q, k, v, shape, cache))


FAMILIES: dict[str, type[Decoder]] = {
    "llama": LlamaDecoder,
    "mistral": LlamaDecoder,
    "qwen2": LlamaDecoder,
    "gpt2": Gpt2Decoder,
}
