"""The replica's state as the Gateway API Inference Extension reads it (metrics.GatewayState).

Read on the event loop at each scrape, from what the engine thread writes: the running rows and
the waiting queue are copied in one step each (a list or deque copy does not interleave with the
engine thread's appends), so a sample may be one step old, never torn. A request the engine has not
yet taken in from its inbox is not counted until the next step. Requests waiting for a resident slot
for their adapter (loading it, or for another to be released) count as waiting, their adapter among
the waiting ones: the endpoint picker should not route more to a replica whose slots are all held.
"""
from __future__ import annotations

from server.adapters.registry import Registry
from server.engine.engine import Engine
from server.engine.scheduler import reserved_tokens
from server.metrics import GatewayState


def gateway_state(engine: Engine, registry: Registry) -> GatewayState:
    rows = list(engine.batch.rows) + engine.chunked.requests()  # a prompt being prefilled in chunks runs
    queued = list(engine.scheduler.waiting)  # waiting count and adapters from this one copy, so they agree
    resident = {e.name for e in registry.all() if e.adapter is not None}
    running = resident | {name for r in rows if r.adapter is not None for name in r.adapter.names}
    slot_waits = registry.slot_waits()  # requests not yet queued: waiting for their adapter's slot
    waiting = {name for r in queued if r.adapter is not None for name in r.adapter.names} | slot_waits.keys()
    reserved = sum(reserved_tokens(r) for r in rows)
    # max_lora: resident slots; unbounded (0), at most one adapter per row of a batch
    max_lora = registry.max_resident or engine.settings.max_batch_size
    return GatewayState(running=len(rows), waiting=len(queued) + sum(slot_waits.values()),
                        kv_usage=reserved / engine.settings.max_batch_tokens,
                        running_adapters=tuple(sorted(running)), waiting_adapters=tuple(sorted(waiting)),
                        max_lora=max_lora)
