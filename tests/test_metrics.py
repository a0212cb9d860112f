"""GET /metrics on a real azmlinfsrv, on each engine: vLLM's names, types and labels, read with prometheus_client's
own parser, and counts that equal what the responses reported; every series vLLM's Grafana dashboard reads has
data, failed requests included (finished_reason="error")."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.engines.engine import Capacity, Row
from mixtral_endpoint.protocol.errors import InternalError
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.serving.line import Line
from mixtral_endpoint.serving.metrics import Metrics
from mixtral_endpoint.serving.service import Scorer

from .test_line import FakeEngine

PROMPTS = ["Once upon a time", "The capital of France is", "In 1969, the first", "Mixture of experts models",
           "def fibonacci(n):", "Dear hiring manager,"]
LABELS = {"model_name": "mixtral-8x7b", "engine": "0"}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = requests.get(url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **extra: str) -> float:
    return samples.get((name, tuple(sorted({**LABELS, **extra}.items()))), 0.0)


def test_metrics_count_what_the_responses_reported(any_server):
    url, _ = any_server
    before = scrape(url)

    def post(i: int) -> dict:
        body = {"input_data": {"input_string": [PROMPTS[i % len(PROMPTS)]]},
                "parameters": {"max_new_tokens": 4 + i, "ignore_eos": True}}
        response = requests.post(url + "/score", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()[0]["usage"]

    with ThreadPoolExecutor(6) as pool:
        usages = list(pool.map(post, range(6)))
    after = scrape(url)

    def grew(name: str, **extra: str) -> float:
        return value(after, name, **extra) - value(before, name, **extra)

    assert grew("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages) == sum(range(4, 10))
    assert grew("vllm:request_success_total", finished_reason="length") == 6
    for histogram in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                      "vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                      "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                      "vllm:request_decode_time_seconds", "vllm:request_max_num_generation_tokens"):
        assert grew(f"{histogram}_count") == 6, histogram
    for tokens in ("vllm:request_generation_tokens", "vllm:request_max_num_generation_tokens"):  # n = 1: equal
        assert grew(f"{tokens}_sum") == sum(range(4, 10))
        assert grew(f"{tokens}_bucket", le="5.0") == 2  # 4 and 5 tokens; vLLM's 1-2-5 buckets
    assert grew("vllm:inter_token_latency_seconds_count") == sum(range(3, 9))  # a gap between each two tokens
    # vLLM's phases add up: the wait in the line and the prefill make the time to first token; with the
    # decode, the whole request (less the rendering after the last token).
    queue, prefill = grew("vllm:request_queue_time_seconds_sum"), grew("vllm:request_prefill_time_seconds_sum")
    decode = grew("vllm:request_decode_time_seconds_sum")
    assert prefill > 0 and decode > 0
    assert queue + prefill == pytest.approx(grew("vllm:time_to_first_token_seconds_sum"), abs=1e-6)
    assert queue + prefill + decode <= grew("vllm:e2e_request_latency_seconds_sum")
    assert value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0


def test_the_gauges_follow_the_line_while_it_is_busy_and_every_finish_reason_is_counted():
    """On a line that holds rows (the live test reads the gauges only idle, and only `length`)."""
    engine = FakeEngine(Capacity(rows=2, kv_tokens=128, block_tokens=16))
    line = Line(engine, max_queue=4)
    metrics = Metrics(line, model_name=LABELS["model_name"], max_model_len=512)
    rows = [Row([1] * 10, SamplingSettings(max_new_tokens=22)) for _ in range(3)]  # 32 tokens each: 2 blocks
    line.take(rows)
    samples = exposed(metrics)
    assert value(samples, "vllm:num_requests_running") == 2 and value(samples, "vllm:num_requests_waiting") == 1
    assert value(samples, "vllm:kv_cache_usage_perc") == 64 / 128
    reasons = ["stop", "length", "abort", "time_limit", "content_filter"]
    for reason in reasons:
        metrics.record(rows[:1], [3], [reason], time.monotonic())
    samples = exposed(metrics)
    assert all(value(samples, "vllm:request_success_total", finished_reason=r) == 1 for r in reasons)


def exposed(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples}


def test_a_request_the_server_fails_counts_as_finished_reason_error(scorer: Scorer, monkeypatch: pytest.MonkeyPatch):
    """vLLM's newer dashboard counts finished_reason="error": each row of a request answered with a 5xx."""
    model = scorer.engine.stepper.model
    forward, passes = model.forward, []

    def fails_once(*args: object, **kwargs: object) -> object:
        passes.append(True)
        if len(passes) == 2:  # the first decode step of both rows (a failed prefill is retried row by row)
            raise RuntimeError("one pass fails (a test hook)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fails_once)
    before = exposed(scorer.metrics)
    payload = {"input_data": {"input_string": ["Once upon a time", "The capital of France is"]},
               "parameters": {"max_new_tokens": 4}}
    with pytest.raises(InternalError):
        score_api.score(scorer, payload)
    after = exposed(scorer.metrics)
    errors = value(after, "vllm:request_success_total", finished_reason="error")
    assert errors - value(before, "vllm:request_success_total", finished_reason="error") == 2
