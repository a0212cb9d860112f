"""No JSON value in any field gets a 500: every field of good /score, OpenAI and MLflow bodies, at every
depth, replaced in turn by every JSON type, gets a request or a 4xx naming that field (or one above it).
Exhaustive, not sampled: 1113 bodies through the pure parsers in seconds, and a sample of them
through a live azmlinfsrv."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from mixtral_endpoint.doors.mlflow_model.pyfunc import input_items
from mixtral_endpoint.doors.openai import protocol as openai_protocol
from mixtral_endpoint.doors.score.protocol import parse_request
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import ScoringError

from .conftest import SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ServerConfig.from_env(SERVER_ENV).limits
# Every JSON type, and the edges of each: null, booleans, integers past 2^64, the largest double,
# empty and nested containers.
VALUES: list[Any] = [None, True, False, 0, -1, 0.5, 1e308, 2**70, "", "x", [], [[]], [1, "a"], {}, {"a": 1},
                     {"role": []}]

SAMPLE = json.loads((ROOT / "sample-request.json").read_text())
SCORE_CHAT = {**SAMPLE, "parameters": {**SAMPLE["parameters"], "max_new_tokens": 4}}  # within the test server's cap
SCORE_TEXT = {"input_data": {"input_string": ["Once upon a time", "x"],
                             "parameters": {"max_new_tokens": 4, "stop": ["\n", "."], "seed": 1}},
              "parameters": {"response_format": {"type": "json_schema", "json_schema": {
                  "name": "n", "strict": True, "schema": {"type": "object", "properties": {"a": {"enum": [1, "x"]}},
                                                          "required": ["a"]}}}}}
OPENAI_CHAT = {"model": "mixtral-8x7b", "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
               "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 2, "stream": True,
               "stream_options": {"include_usage": True}, "user": "u"}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"]}}}
WEATHER_CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
OPENAI_TOOLS = {"model": "mixtral-8x7b", "max_tokens": 4, "parallel_tool_calls": False, "tool_choice": "auto",
                "tools": [WEATHER_TOOL],
                "messages": [{"role": "user", "content": "Weather?"},
                             {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
                             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
OPENAI_COMPLETIONS = {"model": "mixtral-8x7b", "prompt": ["Once upon a time"], "max_tokens": 4, "echo": False,
                      "stop": "\n", "top_k": 5}
# What evaluation and benchmark tools send: log-probabilities, n, OpenAI's penalties and bias, vLLM's extras.
SAMPLING = {"n": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"5": 1.5}, "min_p": 0.1,
            "min_tokens": 1, "stop_token_ids": [5], "seed": 3}
OPENAI_CHAT_LOGPROBS = {"model": "mixtral-8x7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        "logprobs": True, "top_logprobs": 2, **SAMPLING}
OPENAI_ECHO = {"model": "mixtral-8x7b", "prompt": [[1, 415], [1, 5565, 302]], "max_tokens": 1, "temperature": 0,
               "logprobs": 1, "echo": True, "prompt_logprobs": 1, **SAMPLING}
SCORE_SAMPLING = {"input_data": {"input_string": ["Once upon a time"]},
                  "parameters": {"max_new_tokens": 4, "logprobs": 2, "prompt_logprobs": 0, **SAMPLING}}


def mutations(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, body) for every node of `node`, the whole body included, replaced by every JSON value."""
    for value in VALUES:
        if value != node or type(value) is not type(node):
            yield path, value
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        for child_path, replaced in mutations(child, (*path, key)):
            copy = dict(node) if isinstance(node, dict) else list(node)
            copy[key] = replaced
            yield child_path, copy


def named(path: tuple[Any, ...]) -> list[str]:
    """The JSON paths an error about this field may name: the field, or any field above it (not the body as a
    whole: a param of "" would match every field)."""
    text, names = "", []
    for key in path:
        text = f"{text}[{key}]" if isinstance(key, int) else (f"{text}.{key}" if text else key)
        names.append(text)
    return names


def assert_parsed_or_named(parse: Any, body: Any, path: tuple[Any, ...], aliases: dict[str, str]) -> None:
    try:
        parse(body)
    except ScoringError as exc:
        assert 400 <= exc.status < 500, (path, exc.status, exc.message)
        if path and exc.param is not None:
            param = exc.param
            for ours, theirs in aliases.items():
                param = param.replace(ours, theirs)
            allowed = named(path)
            assert any(param == name or param.startswith(name) for name in allowed) or param in _ANYWHERE, (
                path, exc.param, exc.message)


def mlflow_requests(model_input: Any) -> list[Any]:
    """What the pyfunc's predict parses for a dict input: one /score request per item."""
    return [parse_request({"input_data": {"input_string": [item] if isinstance(item, str) else item}}, LIMITS)
            for item in input_items(model_input)]


# Errors about the request as a whole, whichever field made it so (two parameter places that disagree).
_ANYWHERE = {"parameters", "input_data.parameters"}
BODIES = {
    "score chat": (SCORE_CHAT, lambda body: parse_request(body, LIMITS), {}),
    "score text": (SCORE_TEXT, lambda body: parse_request(body, LIMITS), {}),
    "openai chat": (OPENAI_CHAT, lambda body: openai_protocol.parse(body, "chat", LIMITS,
                                                                     extra_parameters="pass-through"), {}),
    "openai tools": (OPENAI_TOOLS, lambda body: openai_protocol.parse(body, "chat", LIMITS, extra_parameters=None), {}),
    "openai completions": (OPENAI_COMPLETIONS, lambda body: openai_protocol.parse(
        body, "completions", LIMITS, extra_parameters="pass-through"), {}),
    "openai chat logprobs": (OPENAI_CHAT_LOGPROBS, lambda body: openai_protocol.parse(
        body, "chat", LIMITS, extra_parameters=None), {}),
    "openai echo": (OPENAI_ECHO, lambda body: openai_protocol.parse(body, "completions", LIMITS,
                                                                    extra_parameters=None), {}),
    "score sampling": (SCORE_SAMPLING, lambda body: parse_request(body, LIMITS), {}),
    "mlflow input": ({"input_string": SCORE_CHAT["input_data"]["input_string"]}, mlflow_requests,
                     {"input_data.input_string": "input_string"}),
}



@pytest.mark.parametrize("name", list(BODIES))
def test_every_json_value_in_every_field_is_a_request_or_a_4xx_naming_the_field(name: str):
    good, parse, aliases = BODIES[name]
    parse(good)  # the unmutated body is good
    count = 0
    for path, body in mutations(good):
        assert_parsed_or_named(parse, body, path, aliases)
        count += 1
    assert count > 100


def test_a_list_or_an_object_as_a_role_is_a_400_naming_it():
    """Found by the outside check: a role that cannot be hashed was a 500 on /v1/chat/completions."""
    for role in ([], {"a": 1}, [["user"]]):
        body = {**OPENAI_CHAT, "messages": [{"role": role, "content": "hi"}]}
        with pytest.raises(ScoringError) as caught:
            openai_protocol.parse(body, "chat", LIMITS, extra_parameters=None)
        assert caught.value.status == 400 and caught.value.param == "messages[0].role"


def test_the_live_server_answers_mutated_bodies_with_200_or_a_json_4xx(server: str):
    """A sample of the same bodies through a real azmlinfsrv (every 25th of each door's): parsing is shared,
    so this checks the doors around it (reading, routing, rendering) add no 500."""
    routes = {"score chat": "/score", "score text": "/score", "openai chat": "/v1/chat/completions",
              "openai tools": "/v1/chat/completions", "openai completions": "/v1/completions",
              "openai chat logprobs": "/v1/chat/completions", "openai echo": "/v1/completions",
              "score sampling": "/score"}
    for name, route in routes.items():
        good = BODIES[name][0]
        for i, (path, body) in enumerate(mutations(good)):
            if i % 25:
                continue
            if isinstance(body, dict) and body.get("stream") is True:
                body = {**body, "stream": False}
            response = requests.post(server + route, json=body, timeout=120)
            assert response.status_code == 200 or 400 <= response.status_code < 500, (name, path, response.text)
            assert isinstance(response.json(), dict | list), (name, path)
