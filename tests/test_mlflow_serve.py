"""`mlflow models serve` on model/: MLflow's own scoring server answers /invocations as /score does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import requests

from mixtral_endpoint.doors.score import serving as score_api
from tests.localserver import free_port

from .conftest import ENGINES, SERVER_ENV

BIN = Path(sys.executable).parent
CONVERSATION = [{"role": "user", "content": "What is so great about the Eiffel Tower?"}]


@pytest.fixture(scope="module", params=ENGINES)
def mlflow_server(mlflow_model: Path, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[str]:
    """`mlflow models serve` on each engine; its answers are compared with our engine's (greedy parity)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("mlflow-serve") / "serve.log").open("wb")
    env = {**os.environ, **SERVER_ENV, "MIXTRAL_ENGINE": request.param,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", str(mlflow_model), "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert process.poll() is None, f"mlflow models serve exited: {Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after 120 s: {Path(log.name).read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/ping", timeout=5).ok
    except requests.RequestException:
        return False


def invoke(url: str, body: dict) -> requests.Response:
    return requests.post(url + "/invocations", json=body, timeout=120)


def test_inputs_and_params_body_gives_the_score_answer(mlflow_server: str, scorer):
    response = invoke(mlflow_server, {"inputs": {"input_string": CONVERSATION},
                                      "params": {"max_new_tokens": 6, "return_full_text": True}})
    assert response.status_code == 200, response.text
    request = {"input_data": {"input_string": CONVERSATION},
               "parameters": {"max_new_tokens": 6, "return_full_text": True}}
    assert response.json() == {"predictions": [score_api.score(scorer, request)]}


def test_dataframe_split_scores_one_prompt_per_row(mlflow_server: str, scorer):
    prompts = ["Once upon a time", "The capital of France is", "x"]
    response = invoke(mlflow_server, {"dataframe_split": {"columns": ["input_string"], "data": [[p] for p in prompts]},
                                      "params": {"max_new_tokens": 5}})
    assert response.status_code == 200, response.text
    expected = [score_api.score(scorer, {"input_data": {"input_string": [p]}, "parameters": {"max_new_tokens": 5}})[0]
                for p in prompts]
    assert response.json() == {"predictions": expected}


def test_max_new_tokens_default_and_cap_are_the_servers(mlflow_server: str):
    """The signature leaves max_new_tokens unset, so MIXTRAL_DEFAULT_MAX_NEW_TOKENS (16) and
    MIXTRAL_MAX_NEW_TOKENS (64) hold here as on /score."""
    response = invoke(mlflow_server, {"inputs": {"input_string": ["Once upon a time"]}, "params": {"ignore_eos": True}})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["usage"]["completion_tokens"] == int(
        SERVER_ENV["MIXTRAL_DEFAULT_MAX_NEW_TOKENS"])
    response = invoke(mlflow_server, {"inputs": {"input_string": ["hi"]}, "params": {"max_new_tokens": 65}})
    assert response.status_code == 400 and "at most 64" in response.json()["message"]


def test_a_json_schema_in_params_constrains_the_answer(mlflow_server: str):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    response = invoke(mlflow_server, {"inputs": {"input_string": CONVERSATION},
                                      "params": {"max_new_tokens": 64, "response_format": response_format}})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    jsonschema.validate(json.loads(prediction["output"]), schema)


@pytest.mark.parametrize(("body", "words"), [
    ({"inputs": {"input_string": [{"role": "assistant", "content": "x"}]}}, "role"),
    ({"inputs": {"input_string": ["hi"]}, "params": {"response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}}}, "uses 'not'"),
    ({"inputs": {"input_string": ["hi"]}, "params": {"temperature": -1}}, "parameters.temperature must be >= 0"),
    ({"inputs": {"input_string": ["hi"]}, "params": {"temperature": "hot"}}, "temperature"),
    ({"inputs": {"input_string": ["hi"]}, "params": {"max_new_tokens": 100_000}}, "max_new_tokens"),
    ({"inputs": {"prompt": ["hi"]}}, "input_string"),
    ({"inputs": {"input_string": ["hi"]}, "params": {"stream": True}}, "/score endpoint only"),
])
def test_bad_input_gets_a_4xx_with_a_message(mlflow_server: str, body: dict, words: str):
    response = invoke(mlflow_server, body)
    assert 400 <= response.status_code < 500, response.text
    assert words in response.json()["message"]
    assert "Traceback" not in response.text
