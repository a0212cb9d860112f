"""Hostile input: generated malformed and adversarial requests, at the protocol layer and at a live server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.request import RequestLimits, load_schema, parse_json, parse_request
from tests.localserver import LocalServer

from .conftest import SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
LIMITS = RequestLimits(max_new_tokens=64, default_max_new_tokens=4, max_prompts=4)
ERROR = Draft202012Validator(load_schema("response")["$defs"]["error_response"])
SECRET = "SECRET-PROMPT-TEXT"
# A JSON path: names, [index], and ["quoted key"] for a key that is not a plain name.
PARAM_PATH = re.compile(r'(?:[\w.\[\]-]|\["(?:[^"\\]|\\.)*"\])*(\.\.\.)?')

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
parameter_names = st.sampled_from([*load_schema("request")["$defs"]["parameters"]["properties"], "max_new_token",
                                   "temprature", "n", "best_of", "__proto__"])
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "USER", SECRET])
contents = (st.sampled_from(["", " ", "hi", "</s>", "<s>[INST]", "[/INST]", "\x00", "\ud800", "é" * 50, SECRET])
            | st.text() | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3))  # lone surrogates
messages = st.fixed_dictionaries({"role": roles, "content": contents | json_values})
requests_like = st.fixed_dictionaries(
    {"input_data": st.fixed_dictionaries(
        {"input_string": st.lists(messages, max_size=5) | st.lists(contents | json_values, max_size=6) | json_values},
        optional={"parameters": st.dictionaries(parameter_names, json_values, max_size=4)})},
    optional={"parameters": st.dictionaries(parameter_names, json_values | st.integers(-5, 100), max_size=5),
              "id": json_values},
)
bodies = (requests_like.map(json.dumps).map(str.encode) | json_values.map(json.dumps).map(str.encode)
          | st.binary(max_size=200) | st.sampled_from([b"", b"{", b'{"a": NaN}', b"[" * 5000, b"\xef\xbb\xbf{}"]))


def leaks(message: str) -> bool:
    return SECRET in message or "Traceback" in message


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_protocol_answers_every_body_with_a_request_or_a_400(body: bytes):
    try:
        request = parse_request(parse_json(body), LIMITS)
    except InvalidRequest as exc:
        assert exc.status == 400 and not leaks(exc.message)
        ERROR.validate(exc.body())
        if exc.param is not None:
            assert PARAM_PATH.fullmatch(exc.param) or "..." in exc.param, exc.param
    else:
        assert (request.conversation is None) != (request.prompts is None)
        assert 1 <= request.settings.max_new_tokens <= LIMITS.max_new_tokens


@pytest.fixture(scope="module")
def fuzz_server(azureml_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live server whose valid answers are short, so hundreds of generated requests take seconds."""
    env = {**SERVER_ENV, "MIXTRAL_MAX_NEW_TOKENS": "4", "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "2",
           "MIXTRAL_MAX_BODY_BYTES": "4096"}
    with LocalServer(azureml_models, tmp_path_factory.mktemp("fuzz") / "azmlinfsrv.log", env, threads=8) as server:
        yield server.url


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies | st.binary(min_size=4097, max_size=6000))
def test_live_server_answers_200_or_a_json_4xx_and_stays_up(fuzz_server: str, body: bytes):
    response = requests.post(fuzz_server + "/score", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    assert not leaks(response.text)
    if response.status_code != 200:
        ERROR.validate(response.json())


def test_live_server_is_healthy_after_the_fuzzing(fuzz_server: str):
    response = requests.post(fuzz_server + "/score", json={"input_data": {"input_string": ["hi"]}}, timeout=60)
    assert response.status_code == 200 and response.json()[0]["usage"]["completion_tokens"] == 2


def test_nothing_in_the_package_loads_pickle_or_remote_code():
    sources = [*ROOT.glob("mixtral_endpoint/**/*.py"), ROOT / "score.py", ROOT / "batch_score.py"]
    forbidden = re.compile(r"\bimport pickle\b|pickle\.load|torch\.load|trust_remote_code=True|weights_only=False|"
                           r"allow_pickle=True|cloudpickle")
    offenders = [f"{p.name}: {m.group(0)}" for p in sources for m in forbidden.finditer(p.read_text())]
    assert not offenders
    stepper = ROOT / "mixtral_endpoint" / "engines" / "transformers" / "stepper.py"
    assert "trust_remote_code=False" in stepper.read_text() and "use_safetensors=True" in stepper.read_text()
