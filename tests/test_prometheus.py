"""A real Prometheus (Debian's `prometheus`, which `make install` installs) scraping live servers every second and
evaluating the shipped alert rules (observability/alerts.yml): after mixed traffic (answered, refused with a
400, streamed) every query of the shipped dashboard (observability/grafana-dashboard.json, which holds every
panel of vLLM's own) returns data on each engine, every alert rule loads and reads series that have data, and
the alerts fire when their conditions are made true: a full line, then its engine stalled past the stall limit
(the scrape fails while a fresh worker loads, then the engine's start time changes).

Prometheus runs once for the module on a free loopback port, with the rules' `for:` cut to 0 s so that a
condition made true fires at the next evaluation."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.engines.engine import Capacity
from mixtral_endpoint.protocol.errors import ModelNotReady, Overloaded
from mixtral_endpoint.serving.line import Line
from mixtral_endpoint.serving.metrics import Metrics
from mixtral_endpoint.serving.service import Scorer
from tests.localserver import LocalServer, free_port

from .conftest import SERVER_ENV
from .test_line import FakeEngine
from .test_metrics import LABELS, exposed, value

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "observability" / "grafana-dashboard.json"
ALERTS = ROOT / "observability" / "alerts.yml"
JOB = "mixtral-endpoint"  # the job name observability/alerts.yml expects
STALL_LIMIT_S = 5.0
INSTALL_HINT = ("Debian's Prometheus is not installed: `make install` installs it (apt-get install prometheus), "
                "or install it by hand; this test needs a real Prometheus and does not skip without one")
# vLLM's Grafana dashboard (vllm-project/vllm, examples/observability/prometheus_grafana/grafana.json at
# 4b5c627c): each panel's title and the series its queries read (by model_name; ours also by job and instance).
VLLM_PANELS = {
    "E2E Request Latency": {"vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
                            "vllm:e2e_request_latency_seconds_count"},
    "Token Throughput": {"vllm:prompt_tokens_total", "vllm:generation_tokens_total"},
    "Inter Token Latency": {"vllm:inter_token_latency_seconds_bucket", "vllm:inter_token_latency_seconds_sum",
                            "vllm:inter_token_latency_seconds_count"},
    "Scheduler State": {"vllm:num_requests_running", "vllm:num_requests_waiting"},
    "Time To First Token Latency": {"vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
                                    "vllm:time_to_first_token_seconds_count"},
    "Cache Utilization": {"vllm:kv_cache_usage_perc"},
    "Request Prompt Length": {"vllm:request_prompt_tokens_bucket"},
    "Request Generation Length": {"vllm:request_generation_tokens_bucket"},
    "Finish Reason": {"vllm:request_success_total"},
    "Queue Time": {"vllm:request_queue_time_seconds_sum"},
    "Requests Prefill and Decode Time": {"vllm:request_prefill_time_seconds_sum",
                                         "vllm:request_decode_time_seconds_sum"},
    "Max Generation Token in Sequence Group": {"vllm:request_max_num_generation_tokens_sum"},
}
_SERIES = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
_COMPARISON = re.compile(r" (==|!=|>=|<=|>|<) ")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        response = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def get(self, path: str) -> dict:
        return requests.get(self.url + path, timeout=30).json()["data"]

    def wait_for(self, expr: str, done: Callable[[list[dict]], bool], timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if done(result):
                return result
            assert time.monotonic() < deadline, f"{expr} still {result} after {timeout} s"
            time.sleep(0.5)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the shipped dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def grafana(expr: str, instance: str) -> str:
    """The query as Grafana sends it for one instance; a rate's window holds the whole test's traffic."""
    for variable, value_ in (("$model_name", LABELS["model_name"]), ("$job", JOB), ("$instance", instance),
                             ("$__rate_interval", "2m")):
        expr = expr.replace(variable, value_)
    assert "$" not in expr, expr
    return expr


@pytest.fixture(scope="module")
def line_server(azureml_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path]]:
    """(server, its hooks' folder): our engine with one place in the batch and one in the queue, the entry script
    whose forward pass blocks for good once $STALL_FILE appears (tests/entry/poisoned_score.py), and a short
    stall limit."""
    hooks = tmp_path_factory.mktemp("line-server")
    env = {**SERVER_ENV, "MIXTRAL_ENGINE": "transformers", "MIXTRAL_MAX_BATCH_SIZE": "1", "MIXTRAL_MAX_QUEUE": "1",
           "MIXTRAL_MAX_PROMPTS": "1", "MIXTRAL_STALL_TIMEOUT_S": str(STALL_LIMIT_S),
           "STALL_FILE": str(hooks / "stall")}
    with LocalServer(azureml_models, hooks / "azmlinfsrv.log", env, threads=8,
                     entry_script=ROOT / "tests" / "entry" / "poisoned_score.py") as server:
        yield server, hooks


@pytest.fixture(scope="module")
def prometheus(server: str, vllm_server: str, line_server: tuple[LocalServer, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(INSTALL_HINT)
    folder = tmp_path_factory.mktemp("prometheus")
    rules = folder / "alerts.yml"
    rules.write_text(re.sub(r"(?m)^(\s+for:) \S+$", r"\1 0s", ALERTS.read_text()))
    targets = [urllib.parse.urlsplit(url).netloc for url in (server, vllm_server, line_server[0].url)]
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}]}
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus not ready after 30 s"
            time.sleep(0.2)
        client = Prometheus(url)
        # Every target up and scraped twice before any test runs: a rate needs two samples, one from before traffic.
        client.wait_for("up == 1", lambda result: len(result) == len(targets))
        client.wait_for("count_over_time(up[1m]) >= 2", lambda result: len(result) == len(targets))
        yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def mixed_traffic(url: str) -> None:
    """Answered requests of several prompts at once, a stream on each door, and 400s, concurrently."""
    text = {"input_data": {"input_string": ["Once upon a time", "The capital of France is"]},
            "parameters": {"max_new_tokens": 8, "ignore_eos": True}}
    stream = {"input_data": {"input_string": ["Dear hiring manager,"]},
              "parameters": {"max_new_tokens": 6, "ignore_eos": True, "stream": True}}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    bad = {"input_data": {"input_string": ["Hi"]}, "parameters": {"temperature": -1}}
    calls = [("/score", text, 200)] * 3 + [("/score", stream, 200), ("/v1/chat/completions", chat, 200)] + [
        ("/score", bad, 400)] * 2

    def call(path: str, body: dict, status: int) -> None:
        response = requests.post(url + path, json=body, timeout=120)  # a stream read to its end
        assert response.status_code == status, response.text

    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(lambda c: call(*c), calls))


def scraped_after_traffic(prometheus: Prometheus, url: str) -> str:
    """The target's instance label, once Prometheus holds the counts the server shows now."""
    instance = urllib.parse.urlsplit(url).netloc
    shown = sum(sample.value for family in _families(url) for sample in family.samples
                if sample.name == "vllm:request_success_total")
    prometheus.wait_for(f'sum(vllm:request_success_total{{instance="{instance}"}})',
                        lambda result: bool(result) and float(result[0]["value"][1]) == shown)
    return instance


def _families(url: str) -> list:
    return list(text_string_to_metric_families(requests.get(url + "/metrics", timeout=30).text))


def test_the_shipped_dashboard_holds_every_panel_of_vllms_reading_the_same_series():
    queries: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        queries.setdefault(title, set()).update(_SERIES.findall(expr))
    for title, series in VLLM_PANELS.items():
        assert queries.get(title) == series, title
    ours = set().union(*queries.values())
    assert {"mixtral:requests_refused_total", "mixtral:engine_healthy", "mixtral:max_num_requests_waiting"} <= ours


def test_every_query_of_the_dashboard_returns_data_on_each_engine(prometheus: Prometheus, server: str,
                                                                   vllm_server: str):
    for url in (vllm_server, server):
        mixed_traffic(url)
    for url in (vllm_server, server):
        instance = scraped_after_traffic(prometheus, url)
        for title, expr in dashboard_queries():
            result = prometheus.query(grafana(expr, instance))
            values = [float(series["value"][1]) for series in result]
            assert values and any(math.isfinite(v) for v in values), f"{url}: {title}: {expr} -> {result}"


def test_every_alert_rule_loads_and_reads_series_that_have_data(prometheus: Prometheus):
    """Each rule loaded and evaluated without error; with `bool` its comparison answers for every series it
    reads, so an empty answer would mean a series that does not exist."""
    deadline = time.monotonic() + 30
    while True:
        (group,) = prometheus.get("/api/v1/rules")["groups"]
        if all(rule["lastEvaluation"] > "2000" for rule in group["rules"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {rule["name"] for rule in group["rules"]} == {
        "MixtralEngineDown", "MixtralTargetDown", "MixtralEngineRestarted", "MixtralQueueFull",
        "MixtralTimeToFirstTokenHigh"}
    for rule in group["rules"]:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert len(_COMPARISON.findall(rule["query"])) == 1, rule["query"]
        assert prometheus.query(_COMPARISON.sub(r" \1 bool ", rule["query"])), rule["query"]


def test_a_full_line_then_a_stalled_engine_fire_their_alerts(prometheus: Prometheus,
                                                             line_server: tuple[LocalServer, Path]):
    """One row blocked in the engine's forward pass, one waiting: the line is full (a third caller gets 429) and
    MixtralQueueFull fires. At the stall limit the engine dies, the worker exits; while a fresh one loads the
    scrape fails (MixtralTargetDown), and once it serves its engine's start time has changed
    (MixtralEngineRestarted)."""
    server, hooks = line_server
    instance = urllib.parse.urlsplit(server.url).netloc
    body = {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {"max_new_tokens": 4}}
    answers: dict[str, int] = {}

    def call(name: str) -> None:
        answers[name] = requests.post(server.url + "/score", json=body, timeout=120).status_code

    (hooks / "stall").touch()
    callers = [threading.Thread(target=call, args=(name,)) for name in ("blocked", "waiting")]
    callers[0].start()
    _wait_for_gauge(server.url, "vllm:num_requests_running", 1)
    callers[1].start()
    _wait_for_gauge(server.url, "vllm:num_requests_waiting", 1)
    assert requests.post(server.url + "/score", json=body, timeout=60).status_code == 429

    def fired(alert: str, timeout: float = 60) -> None:
        prometheus.wait_for(f'max_over_time(ALERTS{{alertname="{alert}", alertstate="firing", '
                            f'instance="{instance}"}}[5m])', bool, timeout)

    fired("MixtralQueueFull")
    for caller in callers:
        caller.join(timeout=60)
    assert answers == {"blocked": 500, "waiting": 503}
    fired("MixtralTargetDown")
    fired("MixtralEngineRestarted", timeout=120)
    assert requests.post(server.url + "/score", json=body, timeout=60).status_code == 200


def _wait_for_gauge(url: str, name: str, wanted: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while value(scraped(url), name) != wanted:
        assert time.monotonic() < deadline, f"{name} never reached {wanted}"
        time.sleep(0.05)


def scraped(url: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in _families(url) for s in family.samples}


def test_the_engine_gauges_read_its_death_and_the_lines_limits():
    engine = FakeEngine(Capacity(rows=3))
    metrics = Metrics(Line(engine, max_queue=5), model_name=LABELS["model_name"], max_model_len=512)
    samples = exposed(metrics)
    assert value(samples, "mixtral:engine_healthy") == 1 and value(samples, "mixtral:engine_start_time_seconds") > 0
    assert value(samples, "mixtral:max_num_requests_running") == 3
    assert value(samples, "mixtral:max_num_requests_waiting") == 5
    engine.dead = RuntimeError("the device is gone")
    assert value(exposed(metrics), "mixtral:engine_healthy") == 0


def test_refusals_are_counted_by_status_and_code_from_zero():
    metrics = Metrics(Line(FakeEngine(Capacity(rows=1)), max_queue=1), model_name=LABELS["model_name"],
                      max_model_len=512)
    for status, code in (("429", "overloaded"), ("503", "model_not_ready")):
        assert value(exposed(metrics), "mixtral:requests_refused_total", status=status, code=code) == 0
    metrics.refused(Overloaded("full"))
    metrics.refused(Overloaded("full"))
    metrics.refused(ModelNotReady("dead"))
    samples = exposed(metrics)
    assert value(samples, "mixtral:requests_refused_total", status="429", code="overloaded") == 2
    assert value(samples, "mixtral:requests_refused_total", status="503", code="model_not_ready") == 1


def test_the_core_counts_the_requests_its_line_refuses(scorer: Scorer, monkeypatch: pytest.MonkeyPatch):
    payload = {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {"max_new_tokens": 2}}
    before = exposed(scorer.metrics)
    for error in (Overloaded("the line is full (a test)"), ModelNotReady("the engine died (a test)")):
        def refuse(rows: object, error: Exception = error) -> None:
            raise error

        monkeypatch.setattr(scorer.line, "take", refuse)
        with pytest.raises(type(error)):
            score_api.score(scorer, payload)
    after = exposed(scorer.metrics)
    for status, code in (("429", "overloaded"), ("503", "model_not_ready")):
        grew = (value(after, "mixtral:requests_refused_total", status=status, code=code)
                - value(before, "mixtral:requests_refused_total", status=status, code=code))
        assert grew == 1, code
