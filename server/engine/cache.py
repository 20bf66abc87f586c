"""The KV cache: one [rows, Hkv, T, D] tensor pair per layer, rows kept compact.

Running requests occupy rows 0..B-1 in join order; a finished row is filled by
moving the last row into it, so a decode step always reads one contiguous slice.
The time axis grows by doubling, up to the model's context length.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_rows: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_len: int = 256,
    ) -> None:
        self.max_len = max_len
        self.capacity = min(initial_len, max_len)
        shape = (max_rows, n_kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def ensure(self, length: int) -> None:
        """Grow the time axis so that `length` positions fit."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"cache length {length} exceeds the context length {self.max_len}")
        new_cap = min(max(length, 2 * self.capacity), self.max_len)
        self.k = [self._grown(t, new_cap) for t in self.k]
        self.v = [self._grown(t, new_cap) for t in self.v]
        self.capacity = new_cap

    @staticmethod
    def _grown(t: Tensor, new_cap: int) -> Tensor:
        rows, heads, cap, dim = t.shape
        out = torch.zeros((rows, heads, new_cap, dim), dtype=t.dtype, device=t.device)
        out[:, :, :cap] = t
        return out

    def write(self, layer: int, row0: int, starts: Tensor, k: Tensor, v: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """Store k/v [N, Hkv, L, D] at positions starts[i].. of rows row0+i; return keys/values [N, Hkv, span, D]."""
        n, _, length, _ = k.shape
        kc = self.k[layer][row0 : row0 + n]  # [N, Hkv, cap, D] (view)
        vc = self.v[layer][row0 : row0 + n]
        if length == 1:
            rows = torch.arange(n, device=k.device)
            kc[rows, :, starts] = k[:, :, 0]
            vc[rows, :, starts] = v[:, :, 0]
        else:
            for i, s in enumerate(starts.tolist()):
                kc[i, :, s : s + length] = k[i]
                vc[i, :, s : s + length] = v[i]
        return kc[:, :, :span], vc[:, :, :span]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]

    def load_prefix(self, row: int, keys: list[Tensor], values: list[Tensor]) -> None:
        """Copy precomputed per-layer k/v [Hkv, P, D] into positions 0..P-1 of a row."""
        for layer, (k, v) in enumerate(zip(keys, values)):
            n_pos = k.shape[1]
            self.k[layer][row, :, :n_pos] = k
            self.v[layer][row, :, :n_pos] = v

    def read_prefix(self, row: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Copies of the first `length` positions of a row, per layer: [Hkv, P, D]."""
        return (
            [t[row, :, :length].clone() for t in self.k],
            [t[row, :, :length].clone() for t in self.v],
        )
