"""End-to-end tier: a real azmlinfsrv process running score.py, over HTTP on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from jsonschema import Draft202012Validator

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.validation import load_schema
from tests.localserver import LocalServer

from .conftest import SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = Draft202012Validator(load_schema("response"))
SECRET = "my-secret-prompt-text"


def post(server: str, body: object | bytes, **kwargs: object) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server + "/score", data=data, timeout=120, **kwargs)


def assert_error(response: requests.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    RESPONSE.validate(body)
    assert "Traceback" not in response.text and SECRET not in response.text
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_health_probe(server: str):
    assert requests.get(server + "/", timeout=10).ok


def test_sample_request_with_curl_defaults(server: str):
    """`curl -d @sample-request.json` sends a form content type; it must still be scored."""
    payload = json.loads((ROOT / "sample-request.json").read_text())
    payload["parameters"]["max_new_tokens"] = 32  # the test server's cap is 64
    response = post(server, payload, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    body = response.json()
    RESPONSE.validate(body)
    assert body["messages"][:-1] == payload["input_data"]["input_string"]
    assert body["usage"]["completion_tokens"] == 32


def test_text_prompts_over_http_match_the_core(server: str, scorer):
    payload = {"input_data": {"input_string": ["Once upon a time", "x"]},
               "parameters": {"max_new_tokens": 8, "return_token_ids": True}}
    response = post(server, payload)
    assert response.status_code == 200
    assert response.json() == score_api.score(scorer, payload)


BAD = [
    (b'{"input_data": ', 400, None),
    (b"", 400, None),
    (b"\xff\xfe\x00", 400, None),
    ({"input_data": {"input_string": [{"role": "assistant", "content": SECRET}]}}, 400,
     "input_data.input_string[0].role"),
    ({"input_data": {"input_string": [{"role": "user", "content": SECRET},
                                      {"role": "assistant", "content": SECRET}]}}, 400,
     "input_data.input_string[1].role"),
    ({"input_data": {"input_string": [SECRET]}, "parameters": {"max_new_token": 5}}, 400,
     "parameters.max_new_token"),
    ({"input_data": {"input_string": [SECRET]}, "parameters": {"temperature": -0.5}}, 400, "parameters.temperature"),
    ({"input_data": {"input_string": [SECRET]}, "parameters": {"top_p": "high"}}, 400, "parameters.top_p"),
    ({"input_data": {"input_string": [SECRET]}, "parameters": {"max_new_tokens": 1000}}, 400,
     "parameters.max_new_tokens"),
    ({"input_data": {"input_string": [SECRET] * 5}}, 400, "input_data.input_string"),
    ({"input_data": {"input_string": [SECRET + " word" * 600]}, "parameters": {"max_new_tokens": 8}}, 400,
     "input_data.input_string[0]"),
    ({"input_data": {"input_string": []}}, 400, "input_data.input_string"),
    ({"input_data": {"input_string": [{"role": "user", "content": ""}]}}, 400, "input_data.input_string[0].content"),
    ({"inputs": [SECRET]}, 400, "input_data"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_malformed_requests_get_a_4xx_naming_the_field(any_server: tuple[str, Path], body: object, status: int,
                                                      param: str | None):
    server, _ = any_server
    assert_error(post(server, body), status, param)


def test_oversized_body_is_413_and_the_server_stays_up(server: str):
    body = {"input_data": {"input_string": ["a" * 70_000]}}
    assert_error(post(server, body), 413)
    assert post(server, {"input_data": {"input_string": ["hi"]}, "parameters": {"max_new_tokens": 2}}).ok


def test_chunked_body_over_the_cap_is_413_without_reading_it_all(server: str):
    """A chunked body declares no length; it is read only up to the cap."""
    chunks = iter([b'{"input_data": {"input_string": ["', b"a" * 70_000, b'"]}}'])
    error = assert_error(post_raw(server, chunks), 413)
    assert "over 65536 bytes" in error["message"]


def test_max_new_tokens_default_and_cap_are_the_servers(server: str):
    response = post(server, {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {"ignore_eos": True}})
    assert response.status_code == 200, response.text
    assert response.json()[0]["usage"]["completion_tokens"] == int(SERVER_ENV["MIXTRAL_DEFAULT_MAX_NEW_TOKENS"])
    error = assert_error(post(server, {"input_data": {"input_string": ["hi"]}, "parameters": {"max_new_tokens": 65}}),
                         400, "parameters.max_new_tokens")
    assert "at most 64" in error["message"]


def post_raw(server: str, chunks: object) -> requests.Response:
    return requests.post(server + "/score", data=chunks, timeout=120, headers={"Content-Type": "application/json"})


def test_get_on_score_is_refused_with_a_json_error(server: str):
    response = requests.get(server + "/score", timeout=10)
    assert 400 <= response.status_code < 500
    assert "error" in response.json()


def test_server_answers_good_requests_after_bad_ones(server: str):
    for body, _, _ in BAD[:5]:
        post(server, body)
    response = post(server, {"input_data": {"input_string": ["hello"]}, "parameters": {"max_new_tokens": 3}})
    assert response.status_code == 200
    assert response.json()[0]["usage"]["completion_tokens"] == 3


def test_one_log_line_per_request_without_the_prompt(server: str, server_log: Path):
    payload = {"input_data": {"input_string": [SECRET]}, "parameters": {"max_new_tokens": 4}}
    response = post(server, payload, headers={"x-request-id": "log-line-test-42"})
    assert response.status_code == 200
    lines = [line for line in server_log.read_text().splitlines() if "request=log-line-test-42" in line]
    assert len(lines) == 1
    assert "prompt_tokens=" in lines[0] and "completion_tokens=4" in lines[0] and "tokens_per_s=" in lines[0]
    assert SECRET not in server_log.read_text()


@pytest.mark.e2e  # a real azmlinfsrv, with no model
def test_init_fails_fast_when_the_model_folder_is_missing(tmp_path: Path):
    """No model: the worker does not boot and the server exits rather than answering with garbage."""
    server = LocalServer(tmp_path / "missing", tmp_path / "log.txt", SERVER_ENV)
    try:
        assert server.wait_ready(timeout=90) is False
        assert "no MLmodel file" in (tmp_path / "log.txt").read_text()
    finally:
        server.stop()
