"""Protocol tier: validation, parameter rules and rendering, without a model (milliseconds)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from mixtral_endpoint.doors.score.protocol import parse_request, render
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.request import Completion, Message, RequestLimits
from mixtral_endpoint.protocol.validation import load_schema, parse_json

ROOT = Path(__file__).resolve().parent.parent
LIMITS = RequestLimits(max_new_tokens=1024, default_max_new_tokens=256, max_prompts=8)
SAMPLE = json.loads((ROOT / "sample-request.json").read_text())


def text_request(**parameters: object) -> dict:
    return {"input_data": {"input_string": ["Once upon a time"]}, "parameters": parameters}


def chat_request(*messages: tuple[str, str], **parameters: object) -> dict:
    return {"input_data": {"input_string": [{"role": r, "content": c} for r, c in messages]},
            "parameters": parameters}


def test_protocol_imports_no_heavy_framework():
    """The protocol floor and the doors' protocols stay pure: importing them pulls in neither torch, mlflow nor
    azureml."""
    import subprocess

    modules = [f"mixtral_endpoint.protocol.{m.stem}" for m in (ROOT / "mixtral_endpoint" / "protocol").glob("*.py")]
    modules += ["mixtral_endpoint.doors.score.protocol", "mixtral_endpoint.doors.openai.protocol"]
    code = (f"import sys, {', '.join(modules)}; "
            "print([m for m in ('torch', 'mlflow', 'azureml_inference_server_http', 'transformers') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_schemas_are_valid_json_schema():
    for name in ("request", "response"):
        Draft202012Validator.check_schema(load_schema(name))


def test_sample_request_is_the_model_cards_and_validates():
    card = (ROOT.parent / "shared" / "model-card.txt")
    if card.exists():
        text = card.read_text()
        block = text.split("### Sample input", 1)[1].split("```json", 1)[1].split("```", 1)[0]
        assert json.loads(block) == SAMPLE
    request = parse_request(SAMPLE, LIMITS)
    assert request.is_chat and len(request.conversation) == 3
    assert request.settings.do_sample and request.settings.temperature == 0.6 and request.settings.top_p == 0.9
    assert request.settings.max_new_tokens == 200 and request.return_full_text


def test_sample_response_validates_against_the_response_schema():
    response = json.loads((ROOT / "sample-response.json").read_text())
    Draft202012Validator(load_schema("response")).validate(response)
    assert response["messages"][:-1] == SAMPLE["input_data"]["input_string"]
    assert response["messages"][-1] == {"role": "assistant", "content": response["output"]}


def test_defaults_when_no_parameters():
    request = parse_request({"input_data": {"input_string": ["hi"]}}, LIMITS)
    s = request.settings
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.top_p, s.top_k) == (256, False, 1.0, 1.0, 0)
    assert (s.repetition_penalty, s.seed, s.ignore_eos) == (1.0, None, False)
    assert s.greedy and not request.return_full_text and not request.return_token_ids
    assert request.stop == () and not request.stream


def test_parameters_inside_input_data_are_read():
    payload = {"input_data": {"input_string": ["hi"], "parameters": {"max_new_tokens": 7, "stop": "x"}}}
    request = parse_request(payload, LIMITS)
    assert request.settings.max_new_tokens == 7 and request.stop == ("x",)


def test_parameters_in_both_places_agreeing_are_accepted():
    payload = {"input_data": {"input_string": ["hi"], "parameters": {"seed": 3}}, "parameters": {"seed": 3}}
    assert parse_request(payload, LIMITS).settings.seed == 3


def test_integral_floats_become_ints_for_the_engine():
    settings = parse_request(text_request(max_new_tokens=5.0, top_k=40.0, seed=3.0), LIMITS).settings
    assert (settings.max_new_tokens, settings.top_k, settings.seed) == (5, 40, 3)
    assert all(type(v) is int for v in (settings.max_new_tokens, settings.top_k, settings.seed))


def test_temperature_zero_is_greedy_even_with_do_sample():
    assert parse_request(text_request(do_sample=True, temperature=0), LIMITS).settings.greedy
    assert not parse_request(text_request(do_sample=True, temperature=0.5), LIMITS).settings.greedy


BAD_REQUESTS = [
    ({}, "input_data", "required"),
    ([], None, "must be an object"),
    ({"input_data": {}}, "input_data.input_string", "required"),
    ({"input_data": {"input_string": []}}, "input_data.input_string", "must not be empty"),
    ({"input_data": {"input_string": "hi"}}, "input_data.input_string", "must be an array"),
    ({"input_data": {"input_string": [{"role": "user"}]}}, "input_data.input_string[0].content", "required"),
    (chat_request(("bot", "x")), "input_data.input_string[0].role", "one of"),
    ({"input_data": {"input_string": [{"role": "user", "content": 5}]}},
     "input_data.input_string[0].content", "must be a string"),
    (chat_request(("user", "")), "input_data.input_string[0].content", "must not be empty"),
    ({"input_data": {"input_string": ["a", 3]}}, "input_data.input_string[1]", "must be a string"),
    ({"input_data": {"input_string": ["a", ""]}}, "input_data.input_string[1]", "must not be empty"),
    ({"input_data": {"input_string": [{"role": "user", "content": "x"}, "a"]}},
     "input_data.input_string[1]", "must be an object"),
    (text_request(max_new_token=3), "parameters.max_new_token", "unknown parameter 'max_new_token'"),
    (text_request(temperature=-1), "parameters.temperature", ">= 0"),
    (text_request(temperature="hot"), "parameters.temperature", "must be a number"),
    (text_request(top_p=0), "parameters.top_p", "> 0"),
    (text_request(top_p=1.5), "parameters.top_p", "<= 1"),
    (text_request(top_k=-1), "parameters.top_k", ">= 0"),
    (text_request(top_k=1.5), "parameters.top_k", "must be an integer"),
    (text_request(max_new_tokens=0), "parameters.max_new_tokens", ">= 1"),
    (text_request(max_new_tokens=5000), "parameters.max_new_tokens", "at most 1024"),
    (text_request(repetition_penalty=0), "parameters.repetition_penalty", "> 0"),
    (text_request(stop=[str(i) for i in range(17)]), "parameters.stop", "at most 16"),
    (text_request(stop=["a", 3]), "parameters.stop[1]", "must be a string"),
    (text_request(stop=""), "parameters.stop", "must not be empty"),
    (text_request(stop="x" * 60_000), "parameters.stop", "60000 characters; at most 200"),
    (text_request(stop=["ok", "y" * 201]), "parameters.stop[1]", "201 characters; at most 200"),
    (text_request(seed=-1), "parameters.seed", ">= 0"),
    (text_request(seed=True), "parameters.seed", "must be an integer"),
    (text_request(do_sample="yes"), "parameters.do_sample", "must be a boolean"),
    ({"input_data": {"input_string": ["a"]}, "parameters": []}, "parameters", "must be an object"),
    ({"input_data": {"input_string": ["a"]}, "extra": 1}, "extra", "unknown field"),
    ({"input_data": {"input_string": ["a"]}, ":": 1}, '[":"]', "unknown field ':'"),
    (text_request(**{"top p": 1}), 'parameters["top p"]', "unknown parameter 'top p'"),
    ({"input_data": {"input_string": ["a"] * 9}}, "input_data.input_string", "at most 8"),
    ({"input_data": {"input_string": ["a"], "parameters": {"seed": 1}}, "parameters": {"seed": 2}},
     "parameters.seed", "both"),
    (chat_request(("user", "x"), ("user", "y")), "input_data.input_string[1].role", "alternate"),
    (chat_request(("user", "x"), ("assistant", "y")), "input_data.input_string[1].role", "end with a user"),
    (chat_request(("assistant", "x"), ("user", "y")), "input_data.input_string[0].role", "alternate"),
    (chat_request(("system", "x")), "input_data.input_string", "only a system"),
    (chat_request(("user", "x"), ("system", "y"), ("user", "z")), "input_data.input_string[1].role", "only first"),
    (chat_request(("user", "ok \ud800")), "input_data.input_string[0].content", "lone UTF-16 surrogate"),
    ({"input_data": {"input_string": ["a", "\udfff"]}}, "input_data.input_string[1]", "lone UTF-16 surrogate"),
    (text_request(stop=["ok", "\ud83d"]), "parameters.stop[1]", "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize(("payload", "param", "words"), BAD_REQUESTS)
def test_bad_request_names_the_field(payload: object, param: str | None, words: str):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(payload, LIMITS)
    assert caught.value.param == param
    assert words in caught.value.message
    assert caught.value.status == 400


def test_error_messages_never_echo_prompt_text():
    secret = "my private medical history " * 20
    for payload in (chat_request(("user", secret), ("user", secret)),
                    {"input_data": {"input_string": [{"role": secret, "content": secret}]}},
                    {"input_data": {"input_string": [secret, 5]}}):
        with pytest.raises(InvalidRequest) as caught:
            parse_request(payload, LIMITS)
        assert "medical" not in json.dumps(caught.value.body())


def test_broken_json_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json(b'{"input_data": ')
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json(b"\xff\xfe")


def test_render_chat_with_full_text_appends_the_reply():
    request = parse_request(chat_request(("system", "s"), ("user", "u"), return_full_text=True,
                                         return_token_ids=True), LIMITS)
    body = render(request, [Completion("reply", (1, 2, 3), (7, 8), "length")])
    assert body["output"] == "reply"
    assert body["messages"][-1] == {"role": "assistant", "content": "reply"}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["prompt_token_ids"] == [1, 2, 3] and body["token_ids"] == [7, 8]
    Draft202012Validator(load_schema("response")).validate(body)


def test_render_text_rows_in_order_with_and_without_full_text():
    payload = {"input_data": {"input_string": ["A", "B"]}}
    # The core hands each text prompt back with its answers (prompt_text), so render needs no request to join them.
    completions = [Completion(" one", (1,), (5,), "stop", prompt_text="A"),
                   Completion(" two", (1,), (6, 7), "length", prompt_text="B")]
    rows = render(parse_request(payload, LIMITS), completions)
    assert [r["0"] for r in rows] == [" one", " two"]
    assert [r["finish_reason"] for r in rows] == ["stop", "length"]
    assert "token_ids" not in rows[0]
    payload["parameters"] = {"return_full_text": True}
    rows = render(parse_request(payload, LIMITS), completions)
    assert [r["0"] for r in rows] == ["A one", "B two"]
    Draft202012Validator(load_schema("response")).validate(rows)


def test_parse_does_not_mutate_the_payload():
    payload = copy.deepcopy(SAMPLE)
    parse_request(payload, LIMITS)
    assert payload == SAMPLE


def test_message_objects_keep_roles_and_content():
    request = parse_request(chat_request(("system", "be brief"), ("user", "hi")), LIMITS)
    assert request.conversation == (Message("system", "be brief"), Message("user", "hi"))
