"""Per-family tiny models (built once per session) and greedy decoding through our decoder and cache."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from server.adapters.lora import LoraPlan
from server.adapters.prompt import PromptAdapter
from server.engine.cache import BlockTable, KVCache
from server.model import BaseModel, load_base_model
from tests.models.families import build

NEW = 5  # greedy tokens per row
PROMPTS = [[5, 9, 300], [17, 2000, 44, 3, 812, 90, 61, 7, 1500, 23, 99], [640, 11, 3070, 8, 250, 31, 4000]]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family -> folder of its tiny model, built on first use."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = build(family, root / family)
        return made[family]

    return get


def hf_model(folder: Path) -> torch.nn.Module:
    """The model as transformers loads it (its default attention), as a reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def served(folder: Path) -> BaseModel:
    return load_base_model(folder, device="cpu", dtype="float32")


@torch.inference_mode()
def greedy(bm: BaseModel, prompts: list[list[int]], rows: list | None = None,
           soft: PromptAdapter | None = None, prefix_cache: bool = False, new: int = NEW) -> tuple[list, Tensor]:
    """Greedy decoding of a batch, prefill then decode steps, as the engine drives the decoder.

    rows: each row's LoRA adapter or None; soft: a soft prompt for every row, its virtual tokens
    prepended (prefix_cache: their KV computed alone first, the prompt starting after them).
    Returns (tokens [N][new], logits [N, new, V])."""
    dec, g, n = bm.decoder, bm.geometry, len(prompts)
    bm.lora_ctx.plan = LoraPlan.build(rows or [None] * n)
    cache = KVCache(g.n_layers, g.n_kv_heads, g.head_dim, g.max_len, bm.dtype, bm.device)
    tables = [BlockTable() for _ in range(n)]
    inputs = [dec.embed(torch.tensor(p)) for p in prompts]  # [L_i, H]
    starts = [0] * n
    if soft is not None and prefix_cache:
        alone = BlockTable()
        dec.forward(soft.embeddings[None], cache.step([alone], [0], soft.n_virtual), cache)
        keys, values = cache.read_prefix(alone, soft.n_virtual)
        for table in tables:
            cache.load_prefix(table, keys, values)
        starts = [soft.n_virtual] * n
    elif soft is not None:
        inputs = [torch.cat([soft.embeddings, x]) for x in inputs]
    width = max(x.shape[0] for x in inputs)
    x = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[0])) for t in inputs])  # [N, L, H]
    hidden = dec.forward(x, cache.step(tables, starts, width), cache)  # [N, L, H]
    last = torch.tensor([t.shape[0] - 1 for t in inputs])
    steps = [dec.logits(hidden[torch.arange(n), last])]  # [N, V]
    lengths = [s + t.shape[0] for s, t in zip(starts, inputs)]
    for _ in range(new - 1):
        ids = steps[-1].argmax(-1)[:, None]  # [N, 1]
        hidden = dec.forward(dec.embed(ids), cache.step(tables, lengths, 1), cache)
        steps.append(dec.logits(hidden[:, 0]))
        lengths = [length + 1 for length in lengths]
    logits = torch.stack(steps, 1)  # [N, new, V]
    return logits.argmax(-1).tolist(), logits


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: list[int], new: int = NEW) -> tuple[list[int], Tensor]:
    """Greedy decoding by re-running the whole sequence through `model`'s forward (PEFT: no generate)."""
    ids, steps = list(prompt), []
    for _ in range(new):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # [V]
        steps.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(steps)
