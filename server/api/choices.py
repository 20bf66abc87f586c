"""One OpenAI request, many engine requests: a choice per (prompt, sample), run or streamed together.

Choice `i * n + j` is sample j of prompt i (OpenAI's order). Seeds follow vLLM: sample j of a
request with `seed` s uses seed s + j, so `n` seeded samples differ and each is reproducible.
The choices enter the engine's queue together or not at all (engine/waiting.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from server.api.generation import Generation, Job, Outcome, Selection
from server.engine.sampling import SamplingParams
from server.engine.waiting import Promise
from server.errors import InvalidRequestError

SEED_SPAN = 2**64  # seeds wrap within what torch.Generator accepts


@dataclass
class Choice:
    index: int
    prompt: int  # which prompt of the request
    job: Job


def sample_params(params: SamplingParams, j: int) -> SamplingParams:
    if params.seed is None or j == 0:
        return params
    seed = params.seed + j
    return replace(params, seed=seed - SEED_SPAN if seed >= SEED_SPAN else seed)


async def open_choices(gen: Generation, adapter: Selection, prompts: list[list[int]], n: int,
                       params: SamplingParams, mode: str | None, limit_name: str) -> list[Choice]:
    """Check every choice's job, the adapter(s) acquired once for all of them (each choice then one
    use of them: a request never waits for a slot it already holds part of); if one is refused,
    the ones already made are released."""
    most = gen.engine.settings.max_waiting  # more choices than may wait could never all be queued
    if len(prompts) * n > most:
        raise InvalidRequestError(f"n: expected at most {most} choices in one request (prompts x n, --max-waiting), "
                                  f"got {len(prompts)} x {n} = {len(prompts) * n}")
    choices: list[Choice] = []
    try:
        for i, ids in enumerate(prompts):
            for j in range(n):
                job = await _job(gen, adapter, choices, ids, sample_params(params, j), mode, limit_name)
                choices.append(Choice(i * n + j, i, job))
    except BaseException:
        for c in choices:
            discard(gen, c.job)
        raise
    return choices


async def _job(gen: Generation, selection: Selection, made: list[Choice], ids: list[int], params: SamplingParams,
               mode: str | None, limit_name: str) -> Job:
    """The first choice acquires the selection; each later one shares what the first holds."""
    if not made:
        return await gen.job(selection, ids, params, mode, limit_name)
    held = made[0].job.adapter
    if held is not None:
        gen.registry.share(held)
    return gen.job_with(held, ids, params, mode, limit_name)


def discard(gen: Generation, job: Job) -> None:
    """Give back a job that will never run."""
    if job.adapter is not None:
        gen.registry.release(job.adapter)


def _places(gen: Generation, choices: list[Choice]) -> Promise:
    """A place in the queue for every choice, or the 429 before any is submitted."""
    job = choices[0].job
    return gen.engine.room.promise(len(choices), job.kind, job.mode, job.adapter_names)


async def run_choices(gen: Generation, choices: list[Choice]) -> list[Outcome]:
    """Every choice's outcome, in index order; the first failure cancels the others."""
    async def run(choice: Choice, promise: Promise) -> Outcome:
        started.add(choice.index)
        return await gen.run(choice.job, promise)

    started: set[int] = set()
    tasks: list[asyncio.Task] = []
    try:
        with _places(gen, choices) as promise:
            tasks = [asyncio.create_task(run(c, promise)) for c in choices]
            return list(await asyncio.gather(*tasks))
    finally:
        await _cancel(gen, tasks, choices, started)


async def _cancel(gen: Generation, tasks: list[asyncio.Task], choices: list[Choice], started: set[int]) -> None:
    """Cancel what still runs; a choice whose task never started never reached the engine: release it here."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in choices:
        if c.index not in started:
            discard(gen, c.job)


_END = object()


async def stream_choices(gen: Generation, choices: list[Choice]) -> AsyncIterator[tuple[Choice, int | None, str, Outcome]]:
    """(choice, token id, new text, outcome) as each choice's `gen.stream` yields them, interleaved."""
    queue: asyncio.Queue = asyncio.Queue()
    started: set[int] = set()

    async def pump(choice: Choice, promise: Promise) -> None:
        started.add(choice.index)
        try:
            async for item in gen.stream(choice.job, promise):
                await queue.put((choice, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((choice, exc))
            return
        await queue.put((choice, _END))

    tasks: list[asyncio.Task] = []
    try:
        with _places(gen, choices) as promise:
            tasks = [asyncio.create_task(pump(c, promise)) for c in choices]
            live = len(tasks)
            while live:
                choice, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is _END:
                    live -= 1
                    continue
                yield (choice, *item)
    finally:
        await _cancel(gen, tasks, choices, started)
