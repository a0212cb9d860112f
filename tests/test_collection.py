"""Azure ML model data collection through azureml-ai-monitoring: off unless enabled; with its local capture on
a live azmlinfsrv, every door's request and answer are collected under the request's id; a collector that
fails or hangs (a patched SDK) never fails or slows a request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.serving.collector import DataCollector
from mixtral_endpoint.serving.service import Scorer
from tests.localserver import LocalServer

from .conftest import SERVER_ENV

CHAT = [{"role": "user", "content": "Collect me."}]


def test_collection_is_off_unless_the_deployment_enables_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AZUREML_MDC_ENABLED", raising=False)
    monkeypatch.delenv("AZUREML_MDC_CONFIG_PATH", raising=False)
    assert not DataCollector().enabled


def captured(log: Path, collection: str, request_id: str) -> list[dict]:
    """The rows local capture logged for one request: `<time> | <collection> | <id> | <json rows>`."""
    for line in log.read_text().splitlines():
        parts = line.split(" | ")
        if len(parts) >= 5 and parts[-3] == collection and parts[-2] == request_id:
            return json.loads(parts[-1])
    return []


def test_every_door_is_collected_under_its_request_id(azureml_models: Path, tmp_path: Path):
    env = {**SERVER_ENV, "AZUREML_MDC_ENABLED": "true", "AZUREML_MDC_LOCAL_CAPTURE": "true"}
    log = tmp_path / "server.log"
    with LocalServer(azureml_models, log, env, threads=4) as server:
        score = requests.post(server.url + "/score", headers={"x-request-id": "score-1"}, timeout=60,
                              json={"input_data": {"input_string": CHAT}, "parameters": {"max_new_tokens": 5}})
        chat = requests.post(server.url + "/v1/chat/completions", headers={"x-request-id": "chat-1"}, timeout=60,
                             json={"messages": CHAT, "max_tokens": 5, "temperature": 0})
        assert score.status_code == chat.status_code == 200
        deadline = time.monotonic() + 30
        while not captured(log, "model_outputs", "chat-1") and time.monotonic() < deadline:
            time.sleep(0.5)
    for request_id, text in (("score-1", score.json()["output"]),
                             ("chat-1", chat.json()["choices"][0]["message"]["content"])):
        (inputs,) = captured(log, "model_inputs", request_id)
        assert json.loads(inputs["input_string"]) == CHAT
        assert json.loads(inputs["parameters"])["max_new_tokens"] == 5
        (outputs,) = captured(log, "model_outputs", request_id)
        assert outputs["output"] == text and outputs["completion_tokens"] == 5


BROKEN_SDK = """
import os, time


class Collector:
    # azureml-ai-monitoring's Collector, made to hang, then fail, from outside the product.
    def __init__(self, *, name, on_error=None):
        self.name = name

    def collect(self, data, correlation_context=None):
        with open(os.environ["BROKEN_SDK_CALLS"], "a") as calls:
            calls.write(self.name + "\\n")
        if self.name == "model_inputs":
            time.sleep(3)  # stuck on its sink
        raise RuntimeError("collector broke")
"""


def test_a_failing_or_hanging_collector_never_fails_or_slows_a_request(scorer: Scorer, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """The collecting child process imports a broken SDK (first on its sys.path); this process keeps the real one."""
    package = tmp_path / "sdk" / "azureml" / "ai" / "monitoring"
    package.mkdir(parents=True)
    for folder in (package.parent.parent, package.parent):
        (folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text(BROKEN_SDK)
    (package / "context.py").write_text("class BasicCorrelationContext:\n    def __init__(self, id=None):\n"
                                        "        self.id = id\n")
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("BROKEN_SDK_CALLS", str(calls))
    monkeypatch.setenv("AZUREML_MDC_ENABLED", "true")  # the real SDK, here, says it is enabled
    monkeypatch.setenv("AZUREML_MDC_WORKER_DISABLED", "true")
    monkeypatch.syspath_prepend(str(tmp_path / "sdk"))
    core = Scorer(scorer.engine, scorer.tokenizer, ServerConfig.from_env(SERVER_ENV))
    core._close.detach()
    assert core.collector is not None and core.collector.enabled
    body = {"input_data": {"input_string": CHAT}, "parameters": {"max_new_tokens": 4}}
    start = time.monotonic()
    answers = [score_api.score(core, body) for _ in range(3)]
    assert time.monotonic() - start < 5 and all(a["finish_reason"] == "length" for a in answers)
    deadline = time.monotonic() + 60
    while (not calls.exists() or calls.read_text().count("model_inputs") < 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert calls.read_text().count("model_inputs") == 3  # each request reached it, one failure after another


def test_the_collecting_process_ends_with_the_scorer(scorer: Scorer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AZUREML_MDC_ENABLED", "true")
    monkeypatch.setenv("AZUREML_MDC_WORKER_DISABLED", "true")
    core = Scorer(scorer.engine, scorer.tokenizer, ServerConfig.from_env(SERVER_ENV))
    core._close.detach()  # the session's engine stays open
    assert core.collector is not None and core.collector.enabled and core.collector._process.is_alive()
    core.close()
    assert core.collector._process.exitcode == 0
