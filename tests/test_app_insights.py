"""Application Insights: with the deployment's app_insights_enabled, azmlinfsrv sends its loggers through an
OpenTelemetry handler, and score.py adds ours, so the per-request line arrives with its fields as attributes
(customDimensions). No Azure can be reached from here: the handler is tested against OpenTelemetry's in-memory
exporter, and the configuration path on a live azmlinfsrv with an instrumentation key."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

import requests
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor

import score
from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.serving.service import Scorer
from tests.localserver import LocalServer

from .conftest import SERVER_ENV

BODY = {"input_data": {"input_string": [{"role": "user", "content": "Hi"}]}, "parameters": {"max_new_tokens": 3}}


def test_the_per_request_line_reaches_the_handler_with_its_fields(scorer: Scorer):
    provider = LoggerProvider()
    exporter = InMemoryLogExporter()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    ours = logging.getLogger("mixtral_endpoint")
    level = ours.level
    ours.setLevel(logging.INFO)  # as init() sets it
    score._log_to_app_insights(ours, SimpleNamespace(appinsights_client=SimpleNamespace(azureLogHandler=handler)))
    try:
        score_api.score(scorer, BODY, request_id="insights-1")
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)
    (record,) = [r.log_record for r in exporter.get_finished_logs()
                 if (r.log_record.attributes or {}).get("request_id") == "insights-1"]
    attributes = dict(record.attributes)
    assert attributes["completion_tokens"] == 3 and attributes["engine"] == "transformers"
    assert attributes["finish_reason"] == "length" and attributes["prompt_tokens"] > 0
    assert {"queue_wait_s", "ttft_s", "seconds", "tokens_per_s", "batch"} <= set(attributes)
    assert "request=insights-1" in str(record.body)


def test_app_insights_enabled_starts_a_server_that_sends_our_lines_too(azureml_models: Path, tmp_path: Path):
    env = {**SERVER_ENV, "AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": str(uuid.uuid4())}
    log = tmp_path / "server.log"
    with LocalServer(azureml_models, log, env, threads=4) as server:
        assert requests.post(server.url + "/score", json=BODY, timeout=60).status_code == 200
    assert "per-request lines go to Application Insights" in log.read_text()
