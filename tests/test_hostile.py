"""Hostile input: generated malformed and adversarial requests, at the protocol layer and at a live server."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mixtral_endpoint.doors.openai import protocol as openai_protocol
from mixtral_endpoint.doors.score.protocol import parse_request
from mixtral_endpoint.protocol.errors import InvalidRequest, ScoringError
from mixtral_endpoint.protocol.request import RequestLimits
from mixtral_endpoint.protocol.validation import load_schema, parse_json
from mixtral_endpoint.serving.service import Scorer
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
# Well-formed constraints, deep and huge: each is served, or refused with a 400 naming its limit; never a
# RecursionError (a schema 200 deep was one) or a grammar that can match nothing.
_WRAPS = [
    lambda s: {"type": "object", "properties": {"a": s}, "required": ["a"]},
    lambda s: {"type": "array", "items": s, "maxItems": 2},
    lambda s: {"anyOf": [s, {"type": "null"}]},
    lambda s: {"type": "array", "prefixItems": [s, {"type": "string", "maxLength": 2}], "items": False},
]  # no $ref: a schema whose only answer is itself ({"$ref": "#"}) is a 500 on both engines (a grammar of no text)
_leaves = st.sampled_from([{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["😀", "🚀", "☃"]},
                           {"const": None}, {"type": "boolean"}])
deep_schemas = st.builds(lambda wraps, leaf: functools.reduce(lambda s, w: _WRAPS[w](s), wraps, leaf),
                         st.integers(0, 300).flatmap(lambda n: st.lists(st.integers(0, len(_WRAPS) - 1), min_size=n,
                                                                         max_size=n)), _leaves)
huge_schemas = st.builds(lambda n, word: {"enum": [f"{word}{i}" for i in range(n)]}, st.integers(1, 5000),
                         st.text(max_size=4))
_texts = st.builds(lambda text, n: text * n,  # emoji and the rest of Unicode, up to past MAX_CHOICE_CHARS
                   st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF) | st.characters(), min_size=1,
                           max_size=3), st.integers(1, 120))
response_formats = st.one_of(
    (deep_schemas | huge_schemas).map(lambda schema: {"type": "json_schema", "json_schema": {"schema": schema}}),
    st.builds(lambda piece, n: {"type": "regex", "regex": piece * n},
              st.sampled_from(["a", "[a-z]", "(x|y)", "😀", "\\d{1,3}", "\ud800"]), st.integers(1, 1500)),
    st.lists(_texts, min_size=1, max_size=300).map(lambda choices: {"type": "choice", "choice": choices}),
    st.just({"type": "choice", "choice": ["a", "\ud83d"]}),  # a lone surrogate, which no text holds
)
constrained = response_formats.map(lambda response_format: {"input_data": {"input_string": ["hi"]}, "parameters": {
    "response_format": response_format, "max_new_tokens": 1}})
many_tools = st.builds(lambda n, schema: [{"type": "function", "function": {"name": f"f{i}", "parameters": schema}}
                                          for i in range(n)], st.integers(0, 200), deep_schemas | huge_schemas)

bodies = (requests_like.map(json.dumps).map(str.encode) | json_values.map(json.dumps).map(str.encode)
          | constrained.map(json.dumps).map(str.encode)
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


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(tools=many_tools)
def test_any_number_and_depth_of_tools_is_a_request_or_a_400(tools: list):
    try:
        openai_protocol.parse({"messages": [{"role": "user", "content": "hi"}], "tools": tools}, "chat", LIMITS,
                              extra_parameters=None)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.param is not None and exc.param.startswith("tools"), exc.param


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=constrained)
def test_the_core_serves_or_refuses_with_a_4xx_every_deep_or_huge_constraint(any_scorer: Scorer, payload: dict):
    """Through the grammar compilers too: ours and vLLM's."""
    try:
        any_scorer.complete(parse_request(payload, any_scorer.config.limits), "fuzz")
    except ScoringError as exc:
        assert 400 <= exc.status < 500, exc.message


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
