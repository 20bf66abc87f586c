"""Forward passes over the batch: prefill of joining rows (with soft-prompt prefixes) and decode steps."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from server.adapters.lora import LoraPlan
from server.adapters.prompt import PrefixKV, PromptAdapter
from server.decoder import PLAIN, StepShape
from server.engine.batch import NO_ADAPTERS, Batch, Plans
from server.engine.cache import BlockTable, KVCache
from server.engine.clock import AdapterClock, TimedHooks
from server.engine.logprobs import TokenLogprob, token_logprobs
from server.engine.prompt_cache import VIRTUAL, Link, context
from server.engine.request import Request
from server.model import BaseModel

SCORE_CHUNK = 512  # prompt positions scored per lm_head call: bounds the [C, V] float32 logits

Scores = list[TokenLogprob] | None  # prompt tokens 1.. of one row; None when it did not ask


class Prefiller:
    def __init__(self, base: BaseModel, cache: KVCache, settings) -> None:
        self.base = base
        self.decoder = base.decoder
        self.cache = cache
        self.lora_ctx = base.lora_ctx
        self.max_prefill_tokens = settings.max_prefill_tokens
        self.prefix_cache = settings.prefix_cache
        self.prompt_cache = settings.prompt_cache

    def warm_up(self) -> None:
        """Tiny forwards (a prefill, a decode step) of a base row, so the first request does not pay for
        lazy initialisation; whatever plans an earlier engine left on the base's wrappers are cleared."""
        table = BlockTable()
        x = self.decoder.embed(torch.zeros((1, 2), dtype=torch.long, device=self.base.device))
        self._forward(x, self.cache.step([table], [0], 2), NO_ADAPTERS)
        self._forward(x[:, :1], self.cache.step([table], [2], 1), NO_ADAPTERS)
        self.cache.release(table)

    def groups(self, joiners: list[Request]) -> Iterator[list[Request]]:
        """Joiners in order, cut into groups of at most --max-prefill-tokens padded tokens."""
        group: list[Request] = []
        for req in joiners:
            longest = max([self.new_len(r) for r in group + [req]])
            if group and longest * (len(group) + 1) > self.max_prefill_tokens:
                yield group
                group = []
            group.append(req)
        if group:
            yield group

    def new_len(self, req: Request) -> int:
        """Tokens this request feeds at prefill (its prompt, plus virtual tokens without the prefix cache)."""
        prompt = _prompt_adapter(req)
        extra = prompt.n_virtual if prompt and not self.prefix_cache else 0
        return len(req.prompt_ids) + extra

    def prefill(self, group: list[Request]) -> tuple[list[int], Tensor, list[Scores]]:
        """Prefill a group into the requests' cache blocks: (cached lengths, last logits [n, V], prompt
        scores). If it raises, the blocks it took are returned."""
        try:
            return self._prefill(group)
        except BaseException:
            for req in group:
                self.cache.release(req.kv)
            raise

    def _prefill(self, group: list[Request]) -> tuple[list[int], Tensor, list[Scores]]:
        starts, inputs = zip(*(self._row_input(req) for req in group))
        length = max(x.shape[0] for x in inputs)
        x = torch.stack([_pad(t, length) for t in inputs])  # [N, L, H]
        for req, start in zip(group, starts):
            self._load_prefix(req, start)
        ends = [start + t.shape[0] for start, t in zip(starts, inputs)]  # past them: the group's padding
        shape = self.cache.step([r.kv for r in group], list(starts), length, ends)
        hidden = self._forward(x, shape, Plans.build(group))  # [N, L, H]
        last = torch.tensor([t.shape[0] - 1 for t in inputs], device=x.device)  # [N]
        logits = self.decoder.logits(hidden[torch.arange(len(group), device=x.device), last])  # [N, V]
        scores = [self._score_prompt(req, hidden[i, : t.shape[0]]) if req.params.prompt_logprobs is not None else None
                  for i, (req, t) in enumerate(zip(group, inputs))]
        for req in group:
            self.publish(req)
        return ends, logits, scores

    def _forward(self, x: Tensor, shape: StepShape, plans: Plans) -> Tensor:
        """x: [N, L, H] -> [N, L, H]: every forward over the cache, with the rows' adapter plans in place."""
        self.lora_ctx.plan = plans.lora
        self.lora_ctx.gate = plans.gate(shape.positions)
        return self.decoder.forward(x, shape, self.cache, plans.residual)

    def _score_prompt(self, req: Request, hidden: Tensor) -> list[TokenLogprob]:
        """hidden: [L, H] of one row, its real prompt last (after any virtual tokens) -> scores of prompt tokens 1.."""
        n_top = req.params.prompt_logprobs
        n = len(req.prompt_ids)
        real = hidden[hidden.shape[0] - n : -1]  # [n - 1, H]: position j predicts prompt token j + 1
        targets = torch.tensor(req.prompt_ids[1:], dtype=torch.long, device=hidden.device)  # [n - 1]
        self.lora_ctx.plan = Plans.build([req]).lora  # lm_head may be a LoRA target: plan this one row
        scores: list[TokenLogprob] = []
        for s in range(0, n - 1, SCORE_CHUNK):
            logits = self.decoder.logits(real[None, s : s + SCORE_CHUNK])[0]  # [C, V]
            scores += token_logprobs(logits, targets[s : s + SCORE_CHUNK], [n_top] * logits.shape[0])
        return scores

    def begin_row(self, req: Request) -> tuple[int, Tensor]:
        """Start a chunked prefill: the soft prompt's prefix loaded into the request's blocks;
        -> (positions cached so far, the input embeddings still to feed [L, H])."""
        start, x = self._row_input(req)
        self._load_prefix(req, start)
        return start, x

    def _load_prefix(self, req: Request, start: int) -> None:
        """With the prefix cache a soft prompt's row starts at its virtual tokens: their KV go in first
        (unless cached prompt blocks already hold them)."""
        if start and not req.kv.blocks:
            prefix = self.prefix_of(req)
            self.cache.load_prefix(req.kv, prefix.keys, prefix.values)

    def prefill_chunk(self, req: Request, start: int, x: Tensor) -> Tensor:
        """x: [L, H] the next chunk of one row's inputs, fed at positions start.. of its blocks
        -> the logits after its last token [1, V]."""
        shape = self.cache.step([req.kv], [start], x.shape[0])
        hidden = self._forward(x[None], shape, Plans.build([req]))  # [1, L, H]
        return self.decoder.logits(hidden[:, -1])

    def _row_input(self, req: Request) -> tuple[int, Tensor]:
        """(cached positions before the new tokens, new input embeddings [L, H]) for one row; cached
        prompt blocks that hold its first positions are put in its block table."""
        req.cached_tokens = 0
        start, x = self._fresh_input(req)
        reused = self._reuse(req, start)
        return reused, x[reused - start :]

    def _fresh_input(self, req: Request) -> tuple[int, Tensor]:
        ids = torch.tensor(req.prompt_ids, dtype=torch.long, device=self.base.device)
        x = self.decoder.embed(ids)  # [L, H]
        prompt = _prompt_adapter(req)
        if prompt is None:
            return 0, x
        if not self.prefix_cache:
            return 0, torch.cat([prompt.embeddings.to(x.dtype), x])  # [n_virtual + L, H]
        return prompt.n_virtual, x

    def _reuse(self, req: Request, start: int) -> int:
        """Take the cached blocks of the row's longest cached prompt start, leaving at least its last
        token to compute; -> the positions they hold (`start` when none, or fewer than a soft prompt's
        virtual tokens, which would be written into shared blocks). A row that wants its prompt scored
        computes all of it."""
        if not self.prompt_cache or req.params.prompt_logprobs is not None or req.kv.blocks:
            return start
        chain = prompt_chain(req, self.cache.block_tokens)
        total = req.n_virtual + len(req.prompt_ids)
        b = self.cache.block_tokens
        blocks = self.cache.prompts.take(chain[: (total - 1) // b], at_least=start // b + 1)  # more than `start`
        if not blocks:
            return start
        held = len(blocks) * b
        req.kv.blocks = blocks
        req.cached_tokens = max(0, held - req.n_virtual)  # without the prefix cache they may hold virtual positions only
        return held

    def publish(self, req: Request) -> None:
        """A row's prompt is in its blocks: cache its full blocks for later requests."""
        if self.prompt_cache:
            chain = prompt_chain(req, self.cache.block_tokens)
            self.cache.prompts.publish(req.kv.blocks[: len(chain)], chain)

    def prefix_of(self, req: Request) -> PrefixKV:
        """The virtual tokens' KV through the row's adapted model (with the LoRA and bottleneck it
        combines them with), computed once per adapter or combination and mode, on first use."""
        prefixes = req.adapter.prefixes
        if req.mode not in prefixes:
            prompt = _prompt_adapter(req)
            n, table = prompt.n_virtual, BlockTable()
            x = prompt.embeddings.to(self.base.dtype)[None]  # [1, n, H]
            try:
                self._forward(x, self.cache.step([table], [0], n), Plans.build([req]))
                prefixes[req.mode] = PrefixKV(*self.cache.read_prefix(table, n))
            finally:
                self.cache.release(table)
        return prefixes[req.mode]

    def decode_logits(self, ids: Tensor, batch: Batch, clock: AdapterClock) -> Tensor:
        """ids: [N, 1] last tokens of the batch rows -> next-token logits [N, V]; adapter time on `clock`."""
        shape = self.cache.step([r.kv for r in batch.rows], batch.lengths, 1)
        plans = batch.plans()
        if clock.active:
            self.lora_ctx.clock = clock
            if plans.residual is not PLAIN:
                plans = replace(plans, residual=TimedHooks(plans.residual, clock))
        try:
            hidden = self._forward(self.decoder.embed(ids), shape, plans)  # [N, 1, H]
        finally:
            self.lora_ctx.clock = None
        return self.decoder.logits(hidden[:, 0])

    def decode_plain(self, ids: Tensor, shape: StepShape, lora: LoraPlan | None) -> Tensor:
        """ids: [N, 1] -> the final hidden states [N, H] of a decode step with no bottleneck row and
        no aLoRA gate: what a CUDA graph captures (engine/graphs.py)."""
        return self._forward(self.decoder.embed(ids), shape, Plans(lora, PLAIN))[:, 0]

    def head(self, hidden: Tensor, lora: LoraPlan | None) -> Tensor:
        """hidden: [N, H] the rows' final hidden states -> logits [N, V], with the rows' LoRA plan in
        place (the head may be a LoRA target; a CUDA graph's replay sets no plan)."""
        self.lora_ctx.plan, self.lora_ctx.gate = lora, None
        return self.decoder.logits(hidden)

    def decode_row(self, ids: Tensor, batch: Batch, i: int) -> Tensor:
        """ids: [1, 1] the last token of batch row i -> its next-token logits [1, V], computed alone
        (the fault path: a step that raised is retried row by row to find the row at fault)."""
        shape = self.cache.step([batch.rows[i].kv], [batch.lengths[i]], 1)
        hidden = self._forward(self.decoder.embed(ids), shape, Plans.build([batch.rows[i]]))  # [1, 1, H]
        return self.decoder.logits(hidden[:, 0])


def prompt_chain(req: Request, block_tokens: int) -> list[Link]:
    """The row's full blocks of prompt positions (a soft prompt's virtual ones first) as the prompt
    cache keys them: each with its context and tokens. An activated LoRA's blocks before its
    invocation are under the base model's context; those from it on under the adapter's and the
    invocation's position (which the tokens after a block decide: the last full occurrence)."""
    tokens = [VIRTUAL] * req.n_virtual + req.prompt_ids
    own, parts, base_until = context(req.adapter, req.mode), req.parts, 0
    if parts.lora is not None and parts.lora.spec.alora_invocation_tokens:
        own = (own, req.lora_start)
        if parts.prompt is None and parts.bottleneck is None:  # an aLoRA alone: the base's before it
            base_until = req.lora_start
    return [(None if end <= base_until else own, tuple(tokens[end - block_tokens : end]))
            for end in range(block_tokens, len(tokens) + 1, block_tokens)]


def _prompt_adapter(req: Request) -> PromptAdapter | None:
    return req.parts.prompt


def _pad(t: Tensor, length: int) -> Tensor:
    """t: [L, H] -> [length, H], zero rows after."""
    return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[0]))
