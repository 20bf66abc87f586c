"""What the engine reports to the metrics: a finished request's timings, a step's adapter time per kind."""
from __future__ import annotations

import time

from server.engine.request import Request
from server.metrics import Metrics


def record_finished(metrics: Metrics, req: Request, status: str) -> None:
    end = time.perf_counter()
    queued = (req.admitted or end) - req.arrived
    ttft = (req.first_token - req.arrived) if req.first_token else None
    n_out = len(req.output_ids)
    tpot = (end - req.first_token) / (n_out - 1) if req.first_token and n_out > 1 else None
    metrics.request_finished(
        req.kind, req.mode, status,
        duration_s=end - req.arrived, queue_s=queued, ttft_s=ttft, tpot_s=tpot,
        prompt_tokens=req.n_virtual + len(req.prompt_ids), cached_tokens=req.cached_tokens, completion_tokens=n_out,
        adapters=req.adapter_names,
    )


def record_adapter_time(metrics: Metrics, kinds: str, seconds: dict[str, float]) -> None:
    """Per kind in the batch: its measured adapter time (merged LoRA and soft prompts add none per step)."""
    for label in kinds.split("+"):
        if label == "lora_unmerged":
            metrics.adapter_layer("lora", "unmerged", seconds.get("lora", 0.0))
        elif label == "lora_merged":
            metrics.adapter_layer("lora", "merged", 0.0)
        elif label in ("bottleneck", "prompt"):
            metrics.adapter_layer(label, None, seconds.get(label, 0.0))
