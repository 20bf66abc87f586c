"""Interactive load with Locust: `locust -f load_tests/locustfile.py --host http://127.0.0.1:8000`.

Each simulated user sends non-streamed greedy requests to a random adapter of the bench model
(built by `python -m load_tests.build_bench_model`, registered on the server under the same names).
"""
from __future__ import annotations

import random

try:
    from locust import HttpUser, between, task
except ImportError as exc:
    raise SystemExit(
        "locust is not installed: `.venv/bin/pip install locust` (or use `python -m load_tests.bench`)"
    ) from exc

from load_tests.client import GenerateRequest, Mode
from load_tests.layout import DOUBLE_SEQ_BN_ADAPTER, PROMPT_ADAPTER, RESIDENT_LORAS, SEQ_BN_ADAPTER, lora_names
from load_tests.prompts import make_prompt

TARGETS: list[tuple[str | None, Mode | None]] = [
    (None, None),
    *((name, "unmerged") for name in lora_names(RESIDENT_LORAS)),
    ("lora-0", "merged"),
    (PROMPT_ADAPTER, None),
    (SEQ_BN_ADAPTER, None),
    (DOUBLE_SEQ_BN_ADAPTER, None),
]
MAX_NEW_TOKENS = 64


class HotswapUser(HttpUser):
    wait_time = between(0.1, 0.5)

    @task
    def generate(self) -> None:
        adapter, mode = random.choice(TARGETS)
        request = GenerateRequest(adapter, make_prompt(random.randrange(1_000_000), seed=0), MAX_NEW_TOKENS, mode)
        label = f"/generate [{adapter or 'base'} {mode or ''}]".replace(" ]", "]")
        self.client.post("/generate", params=request.params(), json=request.body(stream=False), name=label)
