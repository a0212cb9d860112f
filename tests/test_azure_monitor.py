"""The metrics to Azure Monitor (serving/azure_monitor.py): every series GET /metrics shows goes out through
OpenTelemetry under its Prometheus name, with its labels, the instance's name on the resource, and the
values Prometheus reads; as each interval's increase where Azure asks for that. No Azure can be reached from
here: a live azmlinfsrv with an instrumentation key is seen to build the metric envelopes (the exporter keeps
them on disk to retry when ingestion cannot be reached) and to stay healthy and serve meanwhile."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import requests
from opentelemetry.sdk.metrics import ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

import score
from mixtral_endpoint.engines.engine import Capacity, Row
from mixtral_endpoint.protocol.errors import Overloaded
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.serving import azure_monitor
from mixtral_endpoint.serving.line import Line
from mixtral_endpoint.serving.metrics import Metrics
from tests.localserver import LocalServer

from .conftest import SERVER_ENV
from .test_line import FakeEngine

INSTANCE = "mixtral-endpoint-instance-7"
BODY = {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {"max_new_tokens": 3}}


def busy_metrics() -> Metrics:
    """Metrics over a line that holds rows, with rows of every kind recorded and a refusal counted."""
    line = Line(FakeEngine(Capacity(rows=2)), max_queue=4)
    metrics = Metrics(line, model_name="mixtral-8x7b", max_model_len=512)
    line.take([Row([1] * 10, SamplingSettings(max_new_tokens=8)) for _ in range(3)])
    record(metrics, 3)
    metrics.refused(Overloaded("full"))
    return metrics


def record(metrics: Metrics, rows: int) -> None:
    now = time.monotonic()
    for i in range(rows):
        row = Row([1] * (5 + i), SamplingSettings(max_new_tokens=8))
        row.submitted_at, row.started_at, row.first_token_at, row.last_token_at = now - 3, now - 2, now - 1, now
        metrics.record([row], [4 + i], [("stop", "length", "error")[i % 3]], now)


def prometheus_samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples}


def exported(reader: InMemoryMetricReader) -> tuple[dict[tuple[str, tuple], float], dict]:
    """(the points of one collection by (name, labels), the resource's attributes)."""
    data = reader.get_metrics_data()
    (resource_metrics,) = data.resource_metrics
    points = {(metric.name, tuple(sorted(point.attributes.items()))): point.value
              for scope in resource_metrics.scope_metrics for metric in scope.metrics
              for point in metric.data.data_points}
    return points, dict(resource_metrics.resource.attributes)


def test_every_series_goes_out_under_its_prometheus_name_with_its_labels_the_instance_and_its_value():
    metrics = busy_metrics()
    reader = InMemoryMetricReader()
    azure_monitor.meter_provider(metrics.registry, [reader], instance=INSTANCE, service="mixtral-endpoint")
    points, resource = exported(reader)
    assert resource["service.instance.id"] == INSTANCE == resource["host.name"]  # Azure's cloud_RoleInstance
    prometheus = prometheus_samples(metrics)
    # Every counter, gauge and histogram sum and count: the same series, the same value.
    sent = {key: v for key, v in prometheus.items() if not key[0].endswith(("_bucket", "_created"))}
    assert points == sent
    names = {name for name, _ in points}
    assert {"vllm:request_success_total", "vllm:time_to_first_token_seconds_sum", "vllm:num_requests_waiting",
            "vllm:time_to_first_token_seconds_count", "mixtral:requests_refused_total",
            "mixtral:engine_healthy"} <= names
    labels = dict(next(key[1] for key in points if key[0] == "vllm:request_success_total"))
    assert labels.keys() == {"model_name", "engine", "finished_reason"}
    assert points[("vllm:num_requests_running", (("engine", "0"), ("model_name", "mixtral-8x7b")))] == 2


def test_counters_go_out_as_each_intervals_increase_as_application_insights_asks():
    """Azure Monitor's exporter asks for counters as deltas: a chart or alert sums them over time and across
    instances. The second interval carries exactly what Prometheus's counters grew by."""
    metrics = busy_metrics()
    reader = InMemoryMetricReader(preferred_temporality={ObservableCounter: AggregationTemporality.DELTA})
    azure_monitor.meter_provider(metrics.registry, [reader], instance=INSTANCE, service="mixtral-endpoint")
    exported(reader)
    before = prometheus_samples(metrics)
    record(metrics, 5)
    points, _ = exported(reader)
    after = prometheus_samples(metrics)
    for key in (("vllm:request_success_total", (("engine", "0"), ("finished_reason", "stop"),
                                                ("model_name", "mixtral-8x7b"))),
                ("vllm:generation_tokens_total", (("engine", "0"), ("model_name", "mixtral-8x7b"))),
                ("vllm:e2e_request_latency_seconds_count", (("engine", "0"), ("model_name", "mixtral-8x7b")))):
        assert points[key] == after[key] - before[key] > 0, key
    assert points[("vllm:generation_tokens_total", (("engine", "0"), ("model_name", "mixtral-8x7b")))] == 30


def test_without_application_insights_nothing_is_started():
    threads = threading.active_count()
    for blueprint in (SimpleNamespace(), SimpleNamespace(appinsights_client=SimpleNamespace(enabled=False))):
        assert score._metrics_to_azure_monitor(blueprint, busy_metrics().registry) is None
    assert threading.active_count() == threads


def test_an_export_that_cannot_be_set_up_is_logged_and_leaves_nothing_running(caplog):
    threads = threading.active_count()
    assert azure_monitor.start(busy_metrics().registry, "InstrumentationKey=not-a-key", instance=INSTANCE,
                               service="mixtral-endpoint") is None
    assert threading.active_count() == threads
    assert "cannot be sent to Azure Monitor" in caplog.text


def test_the_instance_is_the_host_name_and_a_connection_string_wins_over_the_key():
    assert azure_monitor.instance_name({"HOSTNAME": "pod-1"}) == "pod-1"
    assert azure_monitor.instance_name({})  # the socket's host name
    key = str(uuid.uuid4())
    assert azure_monitor.connection_string({}, key) == f"InstrumentationKey={key}"
    regional = f"InstrumentationKey={key};IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/"
    assert azure_monitor.connection_string({"APPLICATIONINSIGHTS_CONNECTION_STRING": regional}, key) == regional
    assert azure_monitor.export_interval_ms({}) == 60_000 == azure_monitor.export_interval_ms(
        {"OTEL_METRIC_EXPORT_INTERVAL": "soon"})
    assert azure_monitor.export_interval_ms({"OTEL_METRIC_EXPORT_INTERVAL": "1000"}) == 1000


def test_a_live_server_with_an_instrumentation_key_exports_every_interval_and_keeps_serving(
        azureml_models: Path, tmp_path: Path):
    """No Azure can be reached from here (no DNS): each export fails, the exporter keeps its envelopes on disk to
    retry, which is where this test reads what would have gone to Application Insights."""
    key = str(uuid.uuid4())
    env = {**SERVER_ENV, "AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": key,
           "OTEL_METRIC_EXPORT_INTERVAL": "1000", "HOSTNAME": INSTANCE, "TMPDIR": str(tmp_path)}
    log = tmp_path / "server.log"
    with LocalServer(azureml_models, log, env, threads=4) as server:
        assert requests.post(server.url + "/score", json=BODY, timeout=60).status_code == 200
        deadline, metrics = time.monotonic() + 60, {}
        while time.monotonic() < deadline and "vllm:request_success_total" not in metrics:
            time.sleep(1)
            metrics = stored_metric_envelopes(tmp_path)
        # Still healthy and serving after exports that failed, every second.
        assert requests.post(server.url + "/score", json=BODY, timeout=60).status_code == 200
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
    assert f"metrics go to Azure Monitor every 1 s as instance {INSTANCE}" in log.read_text()
    successes = [m for m in metrics["vllm:request_success_total"] if m["properties"].get("finished_reason") == "length"]
    assert all(m["tags"]["ai.cloud.roleInstance"] == INSTANCE for m in successes)
    assert all(m["properties"]["model_name"] == "mixtral-8x7b" for m in successes)
    assert sum(m["value"] for m in successes) >= 1  # each interval's increase: the request before the first
    assert {"vllm:num_requests_running", "vllm:time_to_first_token_seconds_sum", "mixtral:engine_healthy"} <= set(
        metrics)


def stored_metric_envelopes(tmp: Path) -> dict[str, list[dict]]:
    """The metric envelopes the exporter stored to retry, by metric name: each with its value, properties
    (customDimensions) and tags (cloud_RoleInstance)."""
    found: dict[str, list[dict]] = {}
    # "x.blob", or "x.blob@<until>.lock" while leased for a retry; never "x.blob.tmp", still being written.
    for blob in sorted(p for p in tmp.rglob("*.blob*") if p.suffix != ".tmp"):
        for line in blob.read_text().splitlines():
            envelope = json.loads(line)
            data = envelope["data"]["base_data"]
            for metric in data.get("metrics", []):
                found.setdefault(metric["name"], []).append(
                    {"value": metric["value"], "properties": data.get("properties", {}), "tags": envelope["tags"]})
    return found
