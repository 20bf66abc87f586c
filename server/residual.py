"""Where serial adapters join the residual stream of the model's own decoder layers.

A bottleneck adapter replaces the `x + h` of a layer's two residual adds (after attention,
after the MLP) by `hooks.after_attention(i, h, x)` / `hooks.after_ffn(i, h, x)`. The layer code
is transformers', so we reach those points with module hooks, installed for one forward and
removed after it (`ResidualPoints.joined`), and only when some row of the batch has an adapter:

    layer pre-hook        x   = the layer's input                       (captured)
    attention hook        mid = after_attention(i, h_attn, x);  h_attn -> mid - x
    ffn-norm pre-hook     its input -> mid                              (exact, not x + (mid - x))
    mlp hook              h   = the MLP's output                        (captured)
    layer hook            output -> after_ffn(i, h, mid)

The layer's own `x + (mid - x)` may differ from `mid` in the last bit; both places that read it
(the FFN norm and the final residual add) get `mid` itself, so base rows stay bit-identical.

`RESIDUAL_POINTS` names the modules per family: the decoder families AdapterHub `adapters` 1.x
serves bottleneck adapters on (its `models/` table: LlamaModel, MistralModel, GPT2Model), all
pre-LN, residual adds exactly where AdapterHub puts `attention_adapters` / `output_adapters`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


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
class ResidualPoints:
    """Module names, relative to the base model (`model.base_model`), of one family's residual points."""

    layers: str  # the nn.ModuleList of decoder layers
    attention: str  # in a layer: the attention block (its output is h at the first point)
    ffn_norm: str  # in a layer: the norm whose input is the first sum (x + h)
    mlp: str  # in a layer: the MLP block (its output is h at the second point)

    @contextmanager
    def joined(self, base_model: nn.Module, hooks: ResidualHooks) -> Iterator[None]:
        """For the forward calls inside: every layer's residual adds go through `hooks`."""
        handles: list[RemovableHandle] = []
        try:
            for i, layer in enumerate(base_model.get_submodule(self.layers)):
                handles += _LayerJoin(i, hooks).install(layer, self)
            yield
        finally:
            for handle in handles:
                handle.remove()


RESIDUAL_POINTS: dict[str, ResidualPoints] = {
    "llama": ResidualPoints("layers", "self_attn", "post_attention_layernorm", "mlp"),
    "mistral": ResidualPoints("layers", "self_attn", "post_attention_layernorm", "mlp"),
    "gpt2": ResidualPoints("h", "attn", "ln_2", "mlp"),
}


class _LayerJoin:
    """The hooks of one layer for one forward; holds that forward's x, mid and h."""

    def __init__(self, layer: int, hooks: ResidualHooks) -> None:
        self.layer = layer
        self.hooks = hooks
        self.x: Tensor | None = None
        self.mid: Tensor | None = None
        self.h: Tensor | None = None

    def install(self, layer: nn.Module, points: ResidualPoints) -> list[RemovableHandle]:
        return [
            layer.register_forward_pre_hook(self._layer_input, with_kwargs=True),
            layer.get_submodule(points.attention).register_forward_hook(self._attention_output),
            layer.get_submodule(points.ffn_norm).register_forward_pre_hook(self._ffn_norm_input),
            layer.get_submodule(points.mlp).register_forward_hook(self._mlp_output),
            layer.register_forward_hook(self._layer_output),
        ]

    def _layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.x = args[0] if args else kwargs["hidden_states"]  # [N, L, H]

    def _attention_output(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        h, *rest = output  # h: [N, L, H]
        self.mid = self.hooks.after_attention(self.layer, h, self.x)
        return (self.mid - self.x, *rest)

    def _ffn_norm_input(self, module: nn.Module, args: tuple) -> tuple:
        return (self.mid, *args[1:])

    def _mlp_output(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.h = output  # [N, L, H]

    def _layer_output(self, module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
        out = self.hooks.after_ffn(self.layer, self.h, self.mid)
        return (out, *output[1:]) if isinstance(output, tuple) else out
