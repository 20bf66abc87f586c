"""The server's metrics against what the bench measures from outside, per scenario and kind."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from load_tests.scrape import Mean
from load_tests.stats import ScenarioResult, ratio

BASE = ("base", "base")  # (scenario, kind) of the merged-vs-base comparison
MERGED = ("lora-merged", "lora_merged")


def _ms(mean: Mean | None) -> float | None:
    return None if mean is None else mean.mean_ms


@dataclass(frozen=True)
class KindCheck:
    """One kind within one scenario; times in ms."""

    scenario: str
    kind: str
    server_requests: int  # requests the server timed (TPOT observations)
    server_tpot_ms: float | None
    client_gap_ms: float | None
    adapter_ms: float | None  # mean adapter-layer time per measured decode step
    step_ms: float | None  # mean decode step of the batches holding this kind

    @property
    def tpot_ratio(self) -> float | None:
        """Server TPOT / client token gap: 1.0 when both agree."""
        return ratio(self.server_tpot_ms, self.client_gap_ms)

    @property
    def adapter_share(self) -> float | None:
        return ratio(self.adapter_ms, self.step_ms)


def kind_checks(results: Sequence[ScenarioResult]) -> list[KindCheck]:
    """Per scenario with a scrape, each kind that the server or the client saw."""
    checks = []
    for r in results:
        if r.server is None:
            continue
        for kind in sorted(set(r.server.tpot) | set(r.mean_gap_ms)):
            tpot = r.server.tpot.get(kind)
            checks.append(KindCheck(
                scenario=r.name, kind=kind, server_requests=0 if tpot is None else tpot.count,
                server_tpot_ms=_ms(tpot), client_gap_ms=r.mean_gap_ms.get(kind),
                adapter_ms=_ms(r.server.adapter_layer.get(kind)), step_ms=_ms(r.server.steps_with(kind)),
            ))
    return checks


@dataclass(frozen=True)
class Versus:
    """One latency of merged LoRA (scenario `lora-merged`) against base (scenario `base`), in ms."""

    measure: str
    base_ms: float | None
    merged_ms: float | None

    @property
    def merged_to_base(self) -> float | None:
        return ratio(self.merged_ms, self.base_ms)


def merged_vs_base(checks: Sequence[KindCheck]) -> list[Versus]:
    """Server TPOT, server decode step and client token gap; empty unless both scenarios ran."""
    found = {(c.scenario, c.kind): c for c in checks}
    base, merged = found.get(BASE), found.get(MERGED)
    if base is None or merged is None:
        return []
    return [
        Versus("server TPOT", base.server_tpot_ms, merged.server_tpot_ms),
        Versus("server decode step", base.step_ms, merged.step_ms),
        Versus("client token gap", base.client_gap_ms, merged.client_gap_ms),
    ]
