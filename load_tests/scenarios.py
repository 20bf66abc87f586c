"""The named load scenarios: which requests go out together."""
from __future__ import annotations

from dataclasses import dataclass, replace

from load_tests.client import GenerateRequest, Mode
from load_tests.layout import (
    CHURN_LORAS,
    DOUBLE_SEQ_BN_ADAPTER,
    MIXED_BOTTLENECKS,
    PROMPT_ADAPTER,
    RESIDENT_LORAS,
    SEQ_BN_ADAPTER,
    bf16_lora_name,
    bottleneck_name,
    lora_name,
    lora_names,
)
from load_tests.prompts import make_prompt

Combination = tuple[tuple[str, float], ...]  # an `adapters` list: (name, weight) each
Plan = list[tuple[str | Combination | None, Mode | None]]  # (adapter(s), None for base; LoRA mode) per request

UNMERGED: Mode = "unmerged"
MERGED: Mode = "merged"
WARMUP_TOKENS = 4
RAMP_LEVELS = (1, 2, 4, 8, 16, 32, 64)
QUICK_RAMP_LEVELS = (1, 2, 4, 8)
DEFAULT_SCENARIOS = (
    "base", "lora-mixed", "lora-pairs", "lora-merged", "lora-unmerged", "prompt",
    "bottleneck", "all-kinds", "lora-32x8", "ramp",
)
ALL_SCENARIOS = (*DEFAULT_SCENARIOS, "churn", "base-1", "lora-1", "base-32", "lora-32x32", "lora-32x32-bf16",
                 "bottleneck-mixed")


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: tuple[GenerateRequest, ...]
    warm: bool = True  # False: measure cold adapters (no warm-up pass)
    uploads: tuple[str, ...] = ()  # adapters to register through POST /adapters if absent

    @property
    def concurrency(self) -> int:
        return len(self.requests)

    def adapters(self) -> set[str]:
        return {r.adapter for r in self.requests if r.adapter is not None} | {
            name for r in self.requests for name, _ in r.adapters}

    def warmup_requests(self) -> tuple[GenerateRequest, ...]:
        return tuple(replace(r, max_new_tokens=min(WARMUP_TOKENS, r.max_new_tokens)) for r in self.requests)


@dataclass(frozen=True)
class ScenarioSettings:
    max_new_tokens: int = 64
    seed: int = 0
    ramp_levels: tuple[int, ...] = RAMP_LEVELS


def _lora(index: int, mode: Mode) -> tuple[str, Mode]:
    return lora_name(index % RESIDENT_LORAS), mode


def _pair(index: int) -> tuple[Combination, Mode]:
    """Two LoRAs combined, 0.7 and 0.3: lora-i and lora-(i+1), unmerged."""
    return ((lora_name(index % RESIDENT_LORAS), 0.7), (lora_name((index + 1) % RESIDENT_LORAS), 0.3)), UNMERGED


def _plans() -> dict[str, Plan]:
    return {
        "base": [(None, None)] * 8,
        "lora-mixed": [_lora(i, UNMERGED) for i in range(8)],
        "lora-pairs": [_pair(i) for i in range(8)],  # each request combines two LoRAs
        "lora-merged": [_lora(0, MERGED)] * 8,
        "lora-unmerged": [_lora(0, UNMERGED)] * 8,
        "prompt": [(PROMPT_ADAPTER, None)] * 8,
        "bottleneck": [(SEQ_BN_ADAPTER, None)] * 8,
        "bottleneck-mixed": [(bottleneck_name(i), None) for i in range(MIXED_BOTTLENECKS)],  # 8 distinct
        "all-kinds": [
            (None, None), _lora(1, UNMERGED), _lora(2, UNMERGED), _lora(3, MERGED),
            (PROMPT_ADAPTER, None), (SEQ_BN_ADAPTER, None), (DOUBLE_SEQ_BN_ADAPTER, None), (None, None),
        ],
        "lora-32x8": [_lora(i, UNMERGED) for i in range(32)],
        "base-1": [(None, None)],  # one stream: decode at one row
        "lora-1": [_lora(0, UNMERGED)],
        "base-32": [(None, None)] * 32,
        "lora-32x32": [(lora_name(i), UNMERGED) for i in range(32)],  # 32 distinct: needs --churn files
        "lora-32x32-bf16": [(bf16_lora_name(i), UNMERGED) for i in range(32)],  # the same saved in bf16: --bf16
        "churn": [(name, UNMERGED) for name in lora_names(CHURN_LORAS)],
    }


def _scenario(name: str, plan: Plan, settings: ScenarioSettings) -> Scenario:
    requests = tuple(
        GenerateRequest(adapter if not isinstance(adapter, tuple) else None, make_prompt(i, settings.seed),
                        settings.max_new_tokens, mode, adapter if isinstance(adapter, tuple) else ())
        for i, (adapter, mode) in enumerate(plan)
    )
    if name == "lora-32x32":
        return Scenario(name, requests, uploads=tuple(lora_names(32)[RESIDENT_LORAS:]))
    if name == "lora-32x32-bf16":
        return Scenario(name, requests, uploads=tuple(map(bf16_lora_name, range(32))))
    if name == "churn":
        return Scenario(name, requests, warm=False, uploads=tuple(lora_names(CHURN_LORAS)[RESIDENT_LORAS:]))
    return Scenario(name, requests)


def build_scenarios(names: list[str], settings: ScenarioSettings) -> list[Scenario]:
    plans = _plans()
    scenarios: list[Scenario] = []
    for name in names:
        if name == "ramp":
            scenarios += [_scenario(f"ramp-{n}", [(None, None)] * n, settings) for n in settings.ramp_levels]
        elif name in plans:
            scenarios.append(_scenario(name, plans[name], settings))
        else:
            raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(ALL_SCENARIOS)}")
    return scenarios
