"""Decode graphs (engine/graphs.py). On the CPU a stand-in capture replays the forward over the
bucket's static buffers, so what a graph reads is tested here: padded rows and widths, the packed
inputs, which steps may replay, the checks that turn graphs off. The real capture is tested on CUDA."""
from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from load_tests.gpu import load
from server.adapters.lora_delta import SlotTables
from server.engine.cache import NULL_BLOCK, SINK_BLOCK, BlockTable, KVCache
from server.engine.engine import Engine, EngineSettings
from server.engine.graphs import DecodeGraphs, bucket, cuda_capture, uncapturable
from server.engine.request import DoneEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.metrics import Metrics
from server.model import load_base_model
from tests.conftest import FIXTURES, LLAMA
from tests.models.families import COMMON, FAMILIES

PEFT = FIXTURES / "peft" / "tiny-llama"
HUB = FIXTURES / "adapterhub" / "tiny-llama"
PROMPT_LENGTHS = (3, 40, 9, 150, 1, 70)  # rows far apart: tables 1 to 14 blocks wide


def test_bucket_is_the_next_power_of_two_within_the_cap():
    assert [bucket(n, 32) for n in (1, 2, 3, 5, 16, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert bucket(20, 24) == 24


@pytest.mark.parametrize(("family", "extra", "why"), [
    ("llama", {}, None), ("gemma3_text", {}, None), ("mixtral", {}, "MoE"), ("qwen3_moe", {}, "MoE"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic RoPE"),
])
def test_forwards_that_ask_the_host_are_not_captured(family, extra, why):
    config = AutoConfig.for_model(family, **(COMMON | FAMILIES[family] | extra))
    reason = uncapturable(AutoModelForCausalLM.from_config(config))
    assert reason is None if why is None else why in reason


def test_packed_inputs_are_the_eager_steps_plus_padding():
    cache = KVCache(2, 2, 4, 512, torch.float32, torch.device("cpu"), block_tokens=16)
    starts = [3, 40, 150, 16]
    tables = [BlockTable() for _ in starts]
    for table, start in zip(tables, starts):
        cache.fit(table, start)
    rows, width = 8, 16
    packed = cache.decode_inputs(tables, starts, [11, 12, 13, 14], rows, width)
    want = cache.step(tables, starts, 1)
    head, table = packed[: 5 * rows].view(5, rows), packed[5 * rows :].view(rows, width)
    n, eager_width = len(starts), want.table.shape[1]
    assert head[0, :n].tolist() == [11, 12, 13, 14] and head[1, :n].tolist() == starts
    assert torch.equal(head[2, :n], want.lengths)
    assert torch.equal(head[3, :n], want.slot_blocks) and torch.equal(head[4, :n], want.slot_offsets)
    assert torch.equal(table[:n, :eager_width], want.table)
    assert (table[:n, eager_width:] == NULL_BLOCK).all()
    assert head[:, n:].T.tolist() == [[0, 0, 1, SINK_BLOCK, 0]] * (rows - n)  # padding: writes to the sink
    assert (table[n:] == NULL_BLOCK).all()  # ... and reads the null block


class Replayed:
    """The CPU's stand-in for a captured graph: a replay runs the forward again over the static buffers,
    and leaves the LoRA context as it found it, as a graph's replay does (it runs no Python)."""

    captures = 0
    ctx = None  # the engine's LoraContext

    def __init__(self, forward) -> None:
        Replayed.captures += 1
        self.forward = forward
        self.out = forward()
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        before = self.ctx.plan, self.ctx.gate
        self.out.copy_(self.forward())
        self.ctx.plan, self.ctx.gate = before


@pytest.fixture(scope="module")
def setup():
    base = load_base_model(LLAMA, device="cpu", dtype="float32")
    adapters = {name: load(base, name, PEFT / name) for name in ("lora-qv-r8", "lora-all-r16", "prompt-16")}
    adapters["seq_bn-rf16"] = load(base, "seq_bn-rf16", HUB / "seq_bn-rf16")
    return base, adapters


def _run(base, adapters, *phases, graphs=None, batch=8, new_tokens=12) -> tuple[list[list[int]], DecodeGraphs | None]:
    """phases: lists of jobs (adapter name or None, mode, prompt length), each list submitted at once
    after the one before has ended, to one engine -> every job's greedy tokens, in order."""
    engine = Engine(base, EngineSettings(max_batch_size=batch, max_batch_tokens=batch * 512, cuda_graphs=False),
                    Metrics())
    if graphs is not None:
        engine.graphs = DecodeGraphs(engine.prefiller, batch, graphs)
        Replayed.ctx = engine.prefiller.lora_ctx
        engine.clock.every = 1 << 30  # no step's adapter time measured (on CUDA 1 in 32): LoRA steps may replay
    engine.start()
    engine.wait_ready()

    async def one(adapter, mode, n) -> list[int]:
        prompt = torch.randint(2, 4000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        tokens = []
        async for event in engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                           adapters.get(adapter), mode):
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
            elif isinstance(event, DoneEvent) and event.error is not None:
                raise event.error
        return tokens

    async def every() -> list[list[int]]:
        return [tokens for jobs in phases for tokens in await asyncio.gather(*(one(*job) for job in jobs))]

    try:
        return asyncio.run(every()), engine.graphs
    finally:
        engine.stop(30)


JOBS = [(None, "none", n) for n in PROMPT_LENGTHS] + [("prompt-16", "none", 20)]


def test_replayed_buffers_give_the_eager_tokens(setup):
    """Rows of very different lengths, padded to buckets of rows and widths, decode as eagerly."""
    base, adapters = setup
    want, _ = _run(base, adapters, JOBS)
    Replayed.captures = 0
    got, graphs = _run(base, adapters, JOBS, graphs=Replayed)
    assert got == want
    assert graphs.on and Replayed.captures >= 3  # 7 rows, then fewer as they end; widths grow
    assert sum(c.graph.replays for c in graphs._graphs.values()) >= 10


def test_merged_and_unmerged_lora_steps_replay(setup):
    base, adapters = setup
    for mode in ("merged", "unmerged"):
        jobs = [("lora-qv-r8", mode, n) for n in (5, 33)]
        want, _ = _run(base, adapters, jobs)
        Replayed.captures = 0
        got, graphs = _run(base, adapters, jobs, graphs=Replayed)
        assert got == want
        assert graphs.on and Replayed.captures > 0


def test_one_graph_serves_every_composition_of_its_lora_layout(setup, monkeypatch):
    """Rows of two LoRAs (q/v r8 and all-linear r16: a slot without LoRA at some modules), base rows
    and a soft prompt, joining at different steps (long prompts are chunked): a composition of a
    graph's layout refills its slot tables in place, and the tokens are eager decoding's."""
    base, adapters = setup
    jobs = [("lora-qv-r8", "unmerged", n) for n in (3, 70, 9)] + [("lora-all-r16", "unmerged", n) for n in (40, 5)]
    jobs += [(None, "none", 150), ("prompt-16", "none", 12)]
    want, _ = _run(base, adapters, jobs, new_tokens=40)
    calls = {"blank": 0, "fill": 0}
    for name in calls:
        def counted(*args, name=name, method=getattr(SlotTables, name)):
            calls[name] += 1
            return method(*args)
        monkeypatch.setattr(SlotTables, name, counted)
    got, graphs = _run(base, adapters, jobs, graphs=Replayed, new_tokens=40)
    assert got == want
    assert graphs.on and calls["fill"] > calls["blank"] > 0  # a capture fills its blank tables; more: refills


def test_bottleneck_rows_run_eagerly(setup, monkeypatch):
    base, adapters = setup
    jobs = [("seq_bn-rf16", "none", 6), (None, "none", 4), (None, "none", 50)]
    want, _ = _run(base, adapters, jobs)
    graphed = []
    logits = DecodeGraphs.logits
    monkeypatch.setattr(DecodeGraphs, "logits", lambda self, batch: graphed.append(batch.kinds()) or logits(self, batch))
    got, _ = _run(base, adapters, jobs, graphs=Replayed)
    assert got == want
    assert graphed and not any("bottleneck" in kinds for kinds in graphed)


def test_a_lora_on_the_head_is_applied_after_the_replay(setup, tmp_path, caplog):
    """The head runs after the graph, eagerly: with the batch's own LoRA plan, not whatever plan the
    last eager forward (a chunk of another request's prompt) left in the context."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(LLAMA)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    get_peft_model(hf, config).save_pretrained(tmp_path / "head", save_embedding_layers=False)
    base, adapters = setup
    adapters = adapters | {"head": load(base, "head", tmp_path / "head")}
    jobs = [("head", "unmerged", 3), ("head", "unmerged", 9), (None, "none", 5), ("head", "unmerged", 90)]
    want, _ = _run(base, adapters, jobs, new_tokens=30)
    with caplog.at_level(logging.WARNING):
        got, graphs = _run(base, adapters, jobs, graphs=Replayed, new_tokens=30)
    assert got == want and graphs.on
    assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]  # no step fell back


class Wrong(Replayed):
    """A graph whose replays are off by one."""

    def replay(self) -> None:
        super().replay()
        self.out.add_(1.0)


class Frozen(Replayed):
    """A graph that baked its capture's inputs in: every replay gives the capture's output."""

    def __init__(self, forward) -> None:
        super().__init__(forward)
        self.first = self.out.clone()

    def replay(self) -> None:
        self.out.copy_(self.first)


def refuse(forward):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize(("capture", "why"), [(Wrong, "differs"), (Frozen, "differs"), (refuse, "not permitted")])
def test_a_graph_that_differs_or_fails_to_capture_turns_graphs_off(setup, caplog, capture, why):
    base, adapters = setup
    want, _ = _run(base, adapters, JOBS)
    with caplog.at_level(logging.WARNING, logger="server.engine.graphs"):
        got, graphs = _run(base, adapters, JOBS, graphs=capture)
    assert got == want and not graphs.on
    offs = [r.message for r in caplog.records if "CUDA graphs off" in r.message]
    assert len(offs) == 1 and why in offs[0]


def test_a_grown_pool_drops_the_graphs(setup):
    """On the CPU the pool starts at 64 blocks and doubles: a graph captured before reads the old one."""
    base, adapters = setup
    jobs = [(None, "none", n) for n in (500, 480, 470, 300, 200, 100, 50, 5)]  # together > 64 blocks of 16
    want, _ = _run(base, adapters, jobs, new_tokens=80)
    Replayed.captures = 0
    got, graphs = _run(base, adapters, jobs, graphs=Replayed, new_tokens=80)
    assert got == want
    assert graphs.cache.n_blocks > 64
    assert Replayed.captures > len(graphs._graphs)  # those captured before it grew were dropped


@pytest.mark.parametrize("capture", [Replayed, Wrong, refuse])
def test_the_smallest_bucket_is_captured_and_checked_when_the_engine_starts(setup, caplog, capture):
    """Before any request: one row of one block captured and its replay checked (a capture that fails
    or differs turns graphs off then, with one warning), the scratch row's block given back."""
    base, _ = setup
    engine = Engine(base, EngineSettings(max_batch_size=4, cuda_graphs=False), Metrics())
    engine.graphs = DecodeGraphs(engine.prefiller, 4, capture)
    Replayed.ctx = engine.prefiller.lora_ctx
    with caplog.at_level(logging.WARNING, logger="server.engine.graphs"):
        engine.start()
        engine.wait_ready()
        engine.stop(30)
    offs = [r.message for r in caplog.records if "CUDA graphs off" in r.message]
    assert engine.cache.blocks_used == 0
    if capture is Replayed:
        assert engine.graphs.on and list(engine.graphs._graphs) == [(1, 1, None)] and not offs
        assert engine.graphs._graphs[(1, 1, None)].graph.replays == 1
    else:
        assert not engine.graphs.on and len(offs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_replay_what_eager_decodes(dtype):
    """Graphs stay on (each bucket's first replays matched the eager step on its buffers), unmerged
    LoRA rows replay by slot, a bucket captured under the base weights replays the merged ones, and
    the tokens equal eager decoding's.
    In bf16 a padded bucket's GEMMs may round otherwise than the unpadded batch's, so there the tokens
    are compared with a second graphed run instead."""
    base = load_base_model(LLAMA, device="cuda", dtype=dtype)
    adapters = {name: load(base, name, PEFT / name) for name in ("lora-qv-r8", "lora-all-r16", "prompt-16")}
    unmerged = [("lora-qv-r8", "unmerged", n) for n in (3, 70)] + [("lora-all-r16", "unmerged", 40)]
    phases = [JOBS + unmerged, [(None, "none", 7)], [("lora-qv-r8", "merged", 7)]]  # the last two: one bucket
    capture = cuda_capture(torch.device("cuda"))
    got, graphs = _run(base, adapters, *phases, graphs=capture)
    assert graphs.on and graphs._graphs
    want, _ = _run(base, adapters, *phases, graphs=None if dtype == "float32" else capture)
    assert got == want
    assert got[-1] != got[-2]  # the merged LoRA changed the tokens
