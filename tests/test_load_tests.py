"""Fast checks of the load tests' pure parts: no server, no model."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from load_tests.adapterhub import CONFIG_FILE, WEIGHTS_FILE, BaseModelInfo, BottleneckSpec, write_adapter
from load_tests.client import GenerateRequest, HotswapClient, StreamRecorder
from load_tests.crosscheck import kind_checks, merged_vs_base
from load_tests.layout import BenchLayout
from load_tests.prompts import FIRST_ORDINARY_ID, make_prompts
from load_tests.report import (
    GOALS,
    baseline_from_json,
    baseline_json,
    evaluate_goals,
    format_checks,
    format_goals,
    format_scenarios,
    format_table,
    ratio,
    report_json,
)
from load_tests.scenarios import ScenarioSettings, build_scenarios
from load_tests.scrape import Mean, ServerMetrics, delta, parse, row_kind
from load_tests.server_process import ServerOptions, server_command
from load_tests.sse import EventKind, classify, decode_lines, tokens_in
from load_tests.stats import BaselineResult, RequestResult, ScenarioResult, percentile, summarize

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adapterhub" / "tiny-llama"
TINY_LLAMA = BaseModelInfo("tiny-llama", "LlamaForCausalLM", "llama", hidden_size=256, num_layers=4)
FINAL = {"text": "ab", "token_ids": [5, 6], "adapter": None, "kind": "base", "mode": None,
         "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


# percentiles and summaries

def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summarize_counts_tokens_of_successful_requests_only() -> None:
    ok = RequestResult(ttft_s=0.1, e2e_s=1.0, token_gaps_s=[0.01, 0.03], completion_tokens=3)
    failed = RequestResult(error="HTTP 500 internal_error: boom")
    result = summarize("base", 2, [ok, failed], wall_s=2.0)
    assert (result.requests, result.errors, result.tokens) == (2, 1, 3)
    assert result.tokens_per_s == pytest.approx(1.5)
    assert result.requests_per_s == pytest.approx(0.5)
    assert result.ttft.p50_ms == pytest.approx(100.0)
    assert result.per_token.p50_ms == pytest.approx(20.0)
    assert result.error_samples == ["HTTP 500 internal_error: boom"]
    assert result.mean_gap_ms == {}  # no kind: no final event seen


def test_mean_gap_per_kind_averages_each_requests_mean() -> None:
    slow = RequestResult(token_gaps_s=[0.01, 0.03], completion_tokens=3, kind="lora_merged")
    fast = RequestResult(token_gaps_s=[0.01], completion_tokens=2, kind="lora_merged")
    base = RequestResult(token_gaps_s=[0.004], completion_tokens=2, kind="base")
    assert summarize("x", 3, [slow, fast, base], wall_s=1.0).mean_gap_ms == pytest.approx(
        {"base": 4.0, "lora_merged": 15.0})


# server-sent events

def test_sse_decoding_tolerates_the_usual_variations() -> None:
    lines = [
        ": keep-alive", "event: token", 'data: {"token_id": 5, "text": "a"}\r', "",
        'data: {"token_id": 6,', 'data:  "text": "b"}', "",
        'data: {"token_id": 7, "text": "c"}',  # no blank line before the next event
        f"data: {json.dumps(FINAL)}", "", "data: [DONE]", "",
    ]
    events = decode_lines(lines)
    assert [e.get("token_id") for e in events] == [5, 6, 7, None]
    assert [classify(e) for e in events] == [EventKind.TOKEN] * 3 + [EventKind.FINAL]


def test_sse_event_kinds_and_token_counts() -> None:
    assert classify({"error": {"type": "x", "message": "y"}}) is EventKind.ERROR
    assert classify({"token_id": 1, "finish_reason": None, "usage": None}) is EventKind.TOKEN
    assert tokens_in({"token_id": 1}) == 1
    assert tokens_in({"token_ids": [1, 2, 3]}) == 3


def test_stream_recorder_times_tokens_and_takes_usage_from_the_final_event() -> None:
    recorder = StreamRecorder(started=10.0)
    recorder.on_event({"token_id": 1}, 10.5)
    recorder.on_event({"token_id": 2}, 10.6)
    recorder.on_event({"token_ids": [3, 4]}, 11.0)
    recorder.on_event(FINAL | {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, 11.1)
    result = recorder.result()
    assert result.ok and result.completion_tokens == 4
    assert result.ttft_s == pytest.approx(0.5) and result.e2e_s == pytest.approx(1.1)
    assert result.token_gaps_s == pytest.approx([0.1, 0.2, 0.2])
    assert result.kind == "base" and result.mean_gap_s == pytest.approx(0.5 / 3)


def test_stream_recorder_flags_a_stream_without_final_event() -> None:
    recorder = StreamRecorder(started=0.0)
    recorder.on_event({"token_id": 1}, 0.1)
    assert recorder.result().error == "stream ended without a final event"


def _client(handler: httpx.MockTransport) -> HotswapClient:
    return HotswapClient("http://bench.test", transport=handler)


def test_client_streams_generate_with_the_contract_body() -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(url=str(request.url), body=json.loads(request.content))
        events = [{"token_id": 5, "text": "a"}, {"token_id": 6, "text": "b"}, FINAL]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    request = GenerateRequest("lora-0", [7, 8, 9], max_new_tokens=2, mode="merged")
    result = asyncio.run(_client(httpx.MockTransport(handler)).generate(request))
    assert result.ok and result.completion_tokens == 2 and len(result.token_gaps_s) == 1
    assert seen["url"] == "http://bench.test/generate?adapter=lora-0"
    assert seen["body"] == {"prompt_token_ids": [7, 8, 9], "max_new_tokens": 2, "temperature": 0,
                            "stream": True, "mode": "merged"}


def test_client_reports_json_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"type": "adapter_not_found", "message": "no lora-9"}})

    result = asyncio.run(_client(httpx.MockTransport(handler)).generate(GenerateRequest(None, [1], 2)))
    assert result.error == "HTTP 404 adapter_not_found: no lora-9"


# scenarios and prompts

def test_pairs_scenario_combines_two_loras_per_request() -> None:
    [pairs] = build_scenarios(["lora-pairs"], ScenarioSettings(max_new_tokens=4))
    assert pairs.concurrency == 8 and pairs.adapters() == {f"lora-{i}" for i in range(8)}
    first = pairs.requests[0]
    assert first.params() == {} and first.body()["adapters"] == [{"name": "lora-0", "weight": 0.7},
                                                                  {"name": "lora-1", "weight": 0.3}]


def test_scenarios_expand_ramp_and_spread_loras() -> None:
    settings = ScenarioSettings(max_new_tokens=16, ramp_levels=(1, 2))
    scenarios = {s.name: s for s in build_scenarios(["lora-32x8", "all-kinds", "ramp", "churn"], settings)}
    assert list(scenarios) == ["lora-32x8", "all-kinds", "ramp-1", "ramp-2", "churn"]
    assert scenarios["lora-32x8"].adapters() == {f"lora-{i}" for i in range(8)}
    assert scenarios["lora-32x8"].concurrency == 32
    assert {r.mode for r in scenarios["all-kinds"].requests} == {None, "merged", "unmerged"}
    assert len(scenarios["churn"].adapters()) == 64 and not scenarios["churn"].warm
    assert all(r.max_new_tokens == 4 for r in scenarios["ramp-2"].warmup_requests())
    with pytest.raises(ValueError, match="unknown scenario"):
        build_scenarios(["nope"], settings)


def test_prompts_are_seeded_and_avoid_special_tokens() -> None:
    assert make_prompts(4, seed=0) == make_prompts(4, seed=0) != make_prompts(4, seed=1)
    assert all(len(p) == 32 and min(p) >= FIRST_ORDINARY_ID for p in make_prompts(4, seed=0))


# report

def _scenario(name: str, tokens_per_s: float) -> ScenarioResult:
    return summarize(name, 8, [RequestResult(ttft_s=0.1, e2e_s=1.0, completion_tokens=int(tokens_per_s))], 1.0)


def test_format_table_aligns_columns() -> None:
    assert format_table(["name", "n"], [["a", "1"], ["longer", "100"]]).splitlines() == [
        "name      n", "------  ---", "a         1", "longer  100",
    ]
    assert format_table(["n", "what"], [["1", "x"], ["100", "yy"]], align="rl").splitlines()[2] == "  1  x"


def test_goal_ratios_against_base_and_peft() -> None:
    results = [_scenario("base", 100), _scenario("lora-mixed", 95), _scenario("lora-32x8", 400)]
    baseline = [BaselineResult("lora-mixed-8", "m", tokens=50, seconds=1.0),
                BaselineResult("lora-sequential-32x8", "m", tokens=100, seconds=1.0)]
    outcomes = {o.label: o for o in evaluate_goals(results, baseline)}
    assert len(outcomes) == len(GOALS)
    assert outcomes["mixed LoRA / base"].ratio == pytest.approx(0.95) and outcomes["mixed LoRA / base"].met
    assert outcomes["mixed LoRA / PEFT mixed batch"].ratio == pytest.approx(1.9)
    assert outcomes["32 over 8 LoRAs / PEFT one at a time"].met is False
    assert outcomes["merged LoRA / base"].met is None
    assert "MISSED" in format_goals(list(outcomes.values()))
    table = format_scenarios(results, baseline)
    assert "0.95x" in table and "1.90x" in table
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None


def test_baseline_json_round_trip() -> None:
    baseline = [BaselineResult("prompt-8", "forward loop", tokens=512, seconds=4.0)]
    rows = json.loads(json.dumps(baseline_json(baseline)))
    assert rows[0]["tokens_per_s"] == 128.0
    assert baseline_from_json(rows) == baseline


# server metrics scraped around a scenario

def _exposition(tpot: dict[tuple[str, str], tuple[float, int]], layer: dict[tuple[str, str], tuple[float, int]],
                steps: dict[str, tuple[float, int]]) -> str:
    """GET /metrics text as prometheus_client writes it: (sum, count) per series."""
    lines = []
    for name, series in (("hotswap_time_per_output_token_seconds", tpot), ("hotswap_adapter_layer_seconds", layer)):
        lines += [f"# HELP {name} x", f"# TYPE {name} histogram"]
        for (kind, mode), (total, count) in series.items():
            lines += [f'{name}_bucket{{kind="{kind}",le="+Inf",mode="{mode}"}} {float(count)}',
                      f'{name}_count{{kind="{kind}",mode="{mode}"}} {float(count)}',
                      f'{name}_sum{{kind="{kind}",mode="{mode}"}} {total}']
    lines += ["# HELP hotswap_decode_step_seconds x", "# TYPE hotswap_decode_step_seconds histogram"]
    for label, (total, count) in steps.items():
        lines += [f'hotswap_decode_step_seconds_count{{batch_kinds="{label}"}} {float(count)}',
                  f'hotswap_decode_step_seconds_sum{{batch_kinds="{label}"}} {total}']
    lines += ["# HELP hotswap_requests_total x", "# TYPE hotswap_requests_total counter",
              'hotswap_requests_total{kind="base",mode="none",status="ok"} 3.0']
    return "\n".join(lines) + "\n"


BEFORE = _exposition(
    tpot={("base", "none"): (0.1, 4), ("lora", "merged"): (0.0, 0), ("lora", "unmerged"): (0.2, 8)},
    layer={("lora", "merged"): (0.0, 0), ("lora", "unmerged"): (0.01, 20)},
    steps={"base": (0.5, 40)},
)
AFTER = _exposition(
    tpot={("base", "none"): (0.26, 12), ("lora", "merged"): (0.168, 8), ("lora", "unmerged"): (0.2, 8)},
    layer={("lora", "merged"): (0.0, 15), ("lora", "unmerged"): (0.01, 20)},
    steps={"base": (0.8, 55), "lora_merged": (0.3, 15), "base+lora_unmerged": (0.1, 5)},
)


def test_parse_keys_samples_by_name_and_labels() -> None:
    samples = parse(AFTER)
    assert samples[("hotswap_time_per_output_token_seconds_count",
                    frozenset({("kind", "lora"), ("mode", "merged")}))] == 8.0
    assert samples[("hotswap_requests_total", frozenset({("kind", "base"), ("mode", "none"), ("status", "ok")}))] == 3
    assert samples[("hotswap_decode_step_seconds_sum", frozenset({("batch_kinds", "lora_merged")}))] == 0.3


def test_delta_counts_new_series_from_zero() -> None:
    accrued = delta(parse(BEFORE), parse(AFTER))
    assert accrued[("hotswap_decode_step_seconds_count", frozenset({("batch_kinds", "base")}))] == 15.0
    assert accrued[("hotswap_decode_step_seconds_count", frozenset({("batch_kinds", "lora_merged")}))] == 15.0


def test_server_metrics_average_only_what_accrued() -> None:
    server = ServerMetrics.between(BEFORE, AFTER)
    assert server.tpot == {"base": Mean(pytest.approx(20.0), 8), "lora_merged": Mean(pytest.approx(21.0), 8)}
    assert server.adapter_layer == {"lora_merged": Mean(0.0, 15)}  # unmerged did not move
    assert set(server.decode_step) == {"base", "lora_merged", "base+lora_unmerged"}
    assert server.decode_step["base"].mean_ms == pytest.approx(20.0)
    pooled_base = server.steps_with("base")
    assert pooled_base is not None and pooled_base.count == 20
    assert pooled_base.mean_ms == pytest.approx((300.0 + 100.0) / 20)
    assert server.steps_with("prompt") is None
    assert (row_kind("lora", "unmerged"), row_kind("prompt", None), row_kind("base", "none")) == (
        "lora_unmerged", "prompt", "base")


def _measured(name: str, gaps_ms: dict[str, float]) -> ScenarioResult:
    return replace(_scenario(name, 100), mean_gap_ms=gaps_ms, server=ServerMetrics.between(BEFORE, AFTER))


def test_kind_checks_pair_server_and_client_and_compare_merged_with_base() -> None:
    results = [_measured("base", {"base": 25.0}), _measured("lora-merged", {"lora_merged": 21.0}),
               _scenario("unscraped", 100)]
    checks = {(c.scenario, c.kind): c for c in kind_checks(results)}
    assert set(checks) == {("base", "base"), ("base", "lora_merged"), ("lora-merged", "base"),
                           ("lora-merged", "lora_merged")}
    base = checks[("base", "base")]
    assert (base.server_requests, base.client_gap_ms) == (8, 25.0)
    assert base.tpot_ratio == pytest.approx(0.8) and base.adapter_ms is None and base.adapter_share is None
    merged = checks[("lora-merged", "lora_merged")]
    assert merged.tpot_ratio == pytest.approx(1.0)
    assert merged.adapter_ms == 0.0 and merged.step_ms == pytest.approx(20.0) and merged.adapter_share == 0.0
    versus = {v.measure: v for v in merged_vs_base(list(checks.values()))}
    assert versus["server TPOT"].merged_to_base == pytest.approx(21.0 / 20.0)
    assert versus["client token gap"].merged_to_base == pytest.approx(21.0 / 25.0)
    assert merged_vs_base([base]) == []
    text = format_checks(list(checks.values()), list(versus.values()))
    assert "server metrics vs client" in text and "0.80x" in text and "0.0%" in text
    assert "lora merged vs base: server TPOT 21.00 vs 20.00 ms (1.05x)" in text
    report = json.loads(json.dumps(report_json({}, results, [])))
    assert len(report["server_vs_client"]["kinds"]) == 4
    assert report["server_vs_client"]["merged_vs_base"][0]["merged_to_base"] == pytest.approx(1.05)
    assert report["scenarios"][0]["server"]["tpot"]["base"] == {"mean_ms": pytest.approx(20.0), "count": 8}


def test_client_scrapes_metrics() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/metrics"
        return httpx.Response(200, text=AFTER)

    assert asyncio.run(_client(httpx.MockTransport(handler)).metrics_text()) == AFTER


# spawned server command line

def test_server_command_uses_the_contract_flags(tmp_path: Path) -> None:
    layout = BenchLayout(tmp_path)
    options = ServerOptions(layout.model_dir, {"lora-0": layout.adapter_dir("lora-0")})
    command = server_command(options, tmp_path / "store", 8123)
    assert command[1:3] == ["-m", "server"]
    text = " ".join(command)
    for flag in ("--model", "--store", "--host 127.0.0.1", "--port 8123", "--threads 2",
                 "--max-batch-size 64", "--max-resident-adapters 8", f"--adapter lora-0={tmp_path / 'lora-0'}"):
        assert flag in text


# AdapterHub writer against the files the library itself saved

@pytest.mark.parametrize(
    ("fixture", "spec"),
    [
        ("seq_bn-rf16", BottleneckSpec("seq_bn-rf16", "seq_bn", 16, "relu")),
        ("double_seq_bn-rf8", BottleneckSpec("double_seq_bn-rf8", "double_seq_bn", 8, "swish")),
    ],
)
def test_adapterhub_writer_matches_the_library_layout(tmp_path: Path, fixture: str, spec: BottleneckSpec) -> None:
    from safetensors.torch import load_file

    write_adapter(tmp_path, spec, TINY_LLAMA, seed=0)
    expected_dir = FIXTURES / fixture
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == json.loads((expected_dir / CONFIG_FILE).read_text())
    expected_file = expected_dir / WEIGHTS_FILE
    expected = load_file(expected_file) if expected_file.exists() else torch.load(
        expected_dir / "pytorch_adapter.bin", weights_only=True)
    written = load_file(tmp_path / WEIGHTS_FILE)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for v in written.values())
