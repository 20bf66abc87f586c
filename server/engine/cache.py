"""The paged KV cache: fixed-size blocks in one pool, a block table per row.

Position p of a row lives in block `table.blocks[p // B]` at offset p % B (B = `block_tokens`).
A row holds the blocks its tokens fill, so the memory held is proportional to the tokens held,
whatever the lengths of the other rows; a row's blocks return to the pool when it ends.

The pool is one tensor `[2 (k, v), layers, blocks, Hkv, B, D]` (a block holds each head's B
positions contiguously). Two blocks are never handed out:
block 0 stays zeros and pads the tables of shorter rows when a step reads several rows at once;
block 1 takes the writes of a prefill group's padding tokens, past a row's own blocks, and is never
read. Blocks are zeroed when they return, so no row ever reads another request's values, even
masked ones (a masked NaN would still poison the attention product). On the CPU the pool starts
small and doubles when it runs out; on CUDA `initial_blocks` is the whole budget, allocated once.
Full blocks of prompts may be shared between rows and kept after their rows end (`prompts`,
engine/prompt_cache.py): a row lets go of those instead of freeing them, and idle ones are evicted
(zeroed) before the pool grows.

A forward's `StepShape` (built by `step`) says where each new token is written (block and offset)
and which blocks each row reads (`table`, padded with block 0), assembled from each row's blocks as
a tensor (`BlockTable.row`, made once per change of the row's blocks: a step at 128 rows of 8k
positions costs ~0.5 ms, not the ~4 ms of flattening the lists). `store` writes a layer's new k/v;
a decode step then attends straight from the pool (engine/paged_attention.py: C++ on the CPU,
Triton on CUDA); other steps `read` the keys/values they attend over: the new ones themselves when
every row starts at position 0, else the rows' blocks gathered into `[N, Hkv, T, D]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from server.engine.prompt_cache import PromptCache

NULL_BLOCK = 0  # read past a row's blocks: zeros
SINK_BLOCK = 1  # written past a row's blocks (padding): never read
CPU_INITIAL_BLOCKS = 64


def initial_blocks(settings, max_len: int, device: torch.device) -> int:
    """The pool's first size in blocks (settings: the EngineSettings). CUDA: all that admission can
    ask for, allocated once (growing the pool copies it): --max-batch-tokens (or one context, admitted
    alone), each row's last partial block, a prefill group's padding, the null block. CPU: 64 blocks,
    doubling on demand."""
    if torch.device(device).type != "cuda":
        return CPU_INITIAL_BLOCKS
    b = settings.kv_block_tokens
    return (-(-max(settings.max_batch_tokens, max_len) // b) + settings.max_batch_size
            + -(-settings.max_prefill_tokens // b) + 1)


class BlockTable:
    """One row's blocks, in position order. Change them by assigning `blocks` (`+=` assigns): each
    step reads them through `row`, a tensor made once per change, not from the list."""

    def __init__(self, blocks: list[int] | None = None) -> None:
        self._blocks = [] if blocks is None else blocks
        self._row: Tensor | None = None

    @property
    def blocks(self) -> list[int]:
        return self._blocks

    @blocks.setter
    def blocks(self, blocks: list[int]) -> None:
        self._blocks, self._row = blocks, None

    def row(self) -> Tensor:
        """[len(blocks)] long on the host."""
        if self._row is None:
            self._row = torch.tensor(self._blocks, dtype=torch.long)
        return self._row


@dataclass(frozen=True)
class StepShape:
    """Where a forward call reads and writes: N rows, each with L new tokens.

    Row i already holds `starts[i]` cached positions; its L new tokens go to
    positions starts[i] .. starts[i]+L-1 (trailing ones may be padding).
    """

    starts: Tensor  # [N] long
    positions: Tensor  # [N, L] long
    span: int  # T: keys attended (max over rows of starts + L)
    aligned: bool  # all rows start at the same position, and L == 1 or that start is 0: plain causal
    lengths: Tensor  # [N] long: starts + L, the keys each row's last query sees
    slot_blocks: Tensor  # [N * L] long: the block each new token's k/v goes to
    slot_offsets: Tensor  # [N * L] long: ... and its offset in that block
    table: Tensor | None  # [N, ceil(T / B)] long: the blocks each row reads; None when every row starts at 0


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int = 16, initial_blocks: int = CPU_INITIAL_BLOCKS) -> None:
        self.max_len = max_len
        self.block_tokens = block_tokens
        self.device = torch.device(device)
        shape = (2, n_layers, max(initial_blocks, 3), n_kv_heads, block_tokens, head_dim)
        self.pool = torch.zeros(shape, dtype=dtype, device=device)
        self.generation = 0  # times the pool was reallocated (what read the old one must not be replayed)
        self.free = list(range(self.n_blocks - 1, SINK_BLOCK, -1))  # a stack: lowest ids handed out first
        self.prompts = PromptCache()

    @property
    def n_blocks(self) -> int:
        return self.pool.shape[2]

    @property
    def blocks_used(self) -> int:
        """Blocks rows hold (a shared one once)."""
        return self.n_blocks - 2 - len(self.free) - self.prompts.idle_blocks

    @property
    def blocks_cached(self) -> int:
        """Prompt blocks no row holds, kept for later requests."""
        return self.prompts.idle_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.pool[:, :, 0].numel() * self.pool.element_size()

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_tokens)

    # ---- blocks ----------------------------------------------------------------------

    def fit(self, table: BlockTable, length: int) -> None:
        """Give the row enough blocks for `length` positions."""
        if length > self.max_len:
            raise ValueError(f"cache length {length} exceeds the context length {self.max_len}")
        need = self.blocks_for(length) - len(table.blocks)
        if need <= 0:
            return
        evicted: list[int] = []
        while need > len(self.free) + len(evicted) and (idle := self.prompts.evict()) is not None:
            evicted.append(idle)
        self._give_back(evicted)  # zeroed in one write
        if need > len(self.free):
            self._grow(need - len(self.free))
        table.blocks += [self.free.pop() for _ in range(need)]

    def release(self, table: BlockTable) -> None:
        """Return all of a row's blocks (its cached prompt blocks stay, for later requests)."""
        own = []
        for block in table.blocks:
            if self.prompts.holds(block):
                self.prompts.release(block)
            else:
                own.append(block)
        self._give_back(own)
        table.blocks = []

    def _give_back(self, blocks: list[int]) -> None:
        if blocks:
            self.pool[:, :, blocks] = 0
            self.free += reversed(blocks)

    def _grow(self, at_least: int) -> None:
        """Double the pool (or more, to `at_least` new blocks); block ids stay valid."""
        old = self.n_blocks
        new = max(2 * old, old + at_least)
        pool = self.pool.new_zeros((*self.pool.shape[:2], new, *self.pool.shape[3:]))
        pool[:, :, :old] = self.pool
        self.pool = pool
        self.generation += 1
        self.free = list(range(new - 1, old - 1, -1)) + self.free

    # ---- one forward -----------------------------------------------------------------

    def step(self, tables: list[BlockTable], starts: list[int], length: int,
             ends: list[int] | None = None) -> StepShape:
        """The shape of a forward feeding `length` tokens to each row after its `starts[i]` cached
        positions. Row i's blocks are fitted to `ends[i]` first (default starts[i] + length); its
        tokens at positions past that are padding, written to the sink block, and shown to the model
        at the row's last position (a row resuming late in its context, next to a long one, would
        otherwise pass the model position ids past its context)."""
        padded = ends is not None
        ends = ends or [start + length for start in starts]
        for table, end in zip(tables, ends):
            self.fit(table, end)
        device = self.device
        start_t = torch.tensor(starts, dtype=torch.long, device=device)  # [N]
        positions = start_t[:, None] + torch.arange(length, device=device)[None, :]  # [N, L]
        span = max(starts) + length
        aligned = min(starts) == max(starts) and (length == 1 or starts[0] == 0)
        width = self.blocks_for(span)
        rows = _padded([t.row() for t in tables], torch.empty(len(tables), width, dtype=torch.long),
                       SINK_BLOCK).to(device)  # [N, ceil(T / B)]
        b = self.block_tokens
        blocks = rows.gather(1, positions // b).reshape(-1)  # [N * L]
        read = None if max(starts) == 0 else rows.masked_fill(rows == SINK_BLOCK, NULL_BLOCK)
        offsets = (positions % b).reshape(-1)  # [N * L]
        if padded:
            positions = positions.minimum(torch.tensor(ends, device=device)[:, None] - 1)  # [N, L]
        return StepShape(start_t, positions, span, aligned, start_t + length, blocks, offsets, read)

    def decode_inputs(self, tables: list[BlockTable], starts: list[int], ids: list[int], rows: int,
                      width: int) -> Tensor:
        """A decode step's inputs for a bucket of `rows` rows and `width`-block tables (a CUDA graph's,
        engine/graphs.py), packed on the host as one long tensor [5 R + R W]: ids, starts (= positions),
        lengths (starts + 1), the block and offset of each new token's k/v, then the tables [R, W]
        (null-padded). Each row's blocks are fitted to its new position first. The rows past
        len(tables) are padding: token 0 at position 0, written to the sink block, reading the null one."""
        n, b = len(tables), self.block_tokens
        for table, start in zip(tables, starts):
            self.fit(table, start + 1)
        pad = rows - n
        packed = torch.empty(5 * rows + rows * width, dtype=torch.long)
        packed[: 5 * rows] = torch.tensor(
            [ids + [0] * pad, starts + [0] * pad, [s + 1 for s in starts] + [1] * pad,
             [t.blocks[s // b] for t, s in zip(tables, starts)] + [SINK_BLOCK] * pad,
             [s % b for s in starts] + [0] * pad], dtype=torch.long).view(-1)  # [5, R]
        _padded([t.row() for t in tables], packed[5 * rows :].view(rows, width)[:n], NULL_BLOCK)  # [N, W]
        packed[5 * rows + n * width :] = NULL_BLOCK  # the padding rows' tables
        return packed

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's key and value pools, [blocks, Hkv, B, D] each."""
        return self.pool[0, layer], self.pool[1, layer]

    def store(self, layer: int, shape: StepShape, k: Tensor, v: Tensor) -> None:
        """Write a step's new k/v [N, Hkv, L, D] into the rows' blocks."""
        heads, dim = k.shape[1], k.shape[3]
        for pool, new in zip(self.layer(layer), (k, v)):
            pool[shape.slot_blocks, :, shape.slot_offsets] = new.transpose(1, 2).reshape(-1, heads, dim)

    def read(self, layer: int, shape: StepShape, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The keys/values [N, Hkv, T, D] a step with new k/v [N, Hkv, L, D] (already stored) attends over."""
        if shape.table is None:  # every row starts at 0: the new k/v are all there is
            return k, v
        return tuple(self._gather(pool, shape) for pool in self.layer(layer))

    def _gather(self, pool: Tensor, shape: StepShape) -> Tensor:
        """pool: [blocks, Hkv, B, D] -> the rows' first T positions [N, Hkv, T, D] (one copy)."""
        n, width = shape.table.shape
        heads, b, dim = pool.shape[1:]
        rows = pool.index_select(0, shape.table.view(-1)).view(n, width, heads, b, dim)
        return rows.transpose(1, 2).reshape(n, heads, width * b, dim)[:, :, : shape.span]

    # ---- prefixes --------------------------------------------------------------------

    def load_prefix(self, table: BlockTable, keys: list[Tensor], values: list[Tensor]) -> None:
        """Copy precomputed per-layer k/v [Hkv, P, D] into positions 0..P-1 of a row."""
        n_pos = keys[0].shape[1]
        self.fit(table, n_pos)
        blocks, offsets = self._slots(table, n_pos)  # [P] each
        for layer, (k, v) in enumerate(zip(keys, values)):
            for pool, new in zip(self.layer(layer), (k, v)):
                pool[blocks, :, offsets] = new.transpose(0, 1)  # [P, Hkv, D]

    def read_prefix(self, table: BlockTable, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Copies of the first `length` positions of a row, per layer: [Hkv, P, D]."""
        blocks, offsets = self._slots(table, length)  # [P] each
        k, v = (self.pool[i][:, blocks, :, offsets].permute(1, 2, 0, 3) for i in (0, 1))  # [layers, Hkv, P, D]
        return list(k.unbind(0)), list(v.unbind(0))

    def _slots(self, table: BlockTable, length: int) -> tuple[Tensor, Tensor]:
        """(block, offset) of a row's positions 0..length-1, [P] each."""
        positions = torch.arange(length, device=self.device)  # [P]
        blocks = table.row().to(self.device)
        return blocks[positions // self.block_tokens], positions % self.block_tokens


def _padded(rows: list[Tensor], out: Tensor, fill: int) -> Tensor:
    """Rows of blocks [len_i] into out [N, W] long, each cut to W or padded with `fill`; -> out."""
    width = out.shape[1]
    held = pad_sequence([r[:width] for r in rows], batch_first=True, padding_value=fill)  # [N, longest <= W]
    out[:, : held.shape[1]] = held
    out[:, held.shape[1] :] = fill
    return out
