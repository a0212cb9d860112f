"""Pure tier: response_format and tools, parsed and checked before any engine sees them, and tool calls read
back out of an answer. Milliseconds; no model."""

from __future__ import annotations

import json

import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from mixtral_endpoint.doors.openai import protocol as openai_protocol
from mixtral_endpoint.protocol.constraints import (
    _DROPPED_KEYWORDS,
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    Constraint,
    check_schema,
)
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.request import Completion, Piece, RequestLimits
from mixtral_endpoint.protocol.tools import MAX_TOOLS, RESULTS_HEADER, parse_tool_use, read_calls

LIMITS = RequestLimits(max_new_tokens=64, default_max_new_tokens=16, max_prompts=4)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def chat(**body: object) -> openai_protocol.OpenAIRequest:
    return openai_protocol.parse({"messages": [{"role": "user", "content": "Weather in Paris?"}], **body}, "chat",
                                 LIMITS, extra_parameters=None)


@pytest.mark.parametrize(("keyword", "schema", "breaks_it"), [
    ("not", {"not": {"type": "string"}}, '"a"'),
    ("if", {"if": {"type": "string"}, "then": {"minLength": 2}}, '"a"'),
    ("dependentSchemas", {"type": "object", "properties": {"a": {"type": "integer"}},
                          "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1}'),
])
def test_the_keywords_refused_are_those_xgrammar_drops(keyword, schema, breaks_it):
    """If a new xgrammar enforces one of them, this fails: take it off the refused list."""
    assert keyword in _DROPPED_KEYWORDS
    assert accepts(xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False), breaks_it)
    with pytest.raises(InvalidRequest, match=f"'{keyword}'"):
        check_schema({"type": "object", "properties": {"x": schema}}, "s")


def test_a_schema_that_is_not_one_names_where():
    with pytest.raises(InvalidRequest) as caught:
        check_schema({"type": "object", "properties": {"a": {"minLength": "3"}}}, "response_format")
    assert caught.value.param == "response_format.properties.a.minLength"


def test_names_under_properties_are_not_keywords():
    check_schema({"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}}, "s")


def test_response_format_on_the_openai_routes_is_the_same_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert parsed.request.settings.constraint == Constraint.json_schema(schema)
    assert chat(response_format={"type": "text"}).request.settings.constraint is None
    completions = openai_protocol.parse({"prompt": "x", "response_format": {"type": "json_object"}}, "completions",
                                        LIMITS, extra_parameters=None)
    assert completions.request.settings.constraint == Constraint.json_schema({"type": "object"})


@pytest.mark.parametrize(("choice", "names", "at_most_one"), [
    ("required", {"get_weather", "get_time"}, False),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}, True),
])
def test_tool_choice_decides_which_calls_the_grammar_allows(choice, names, at_most_one):
    parsed = chat(tools=[WEATHER, TIME], tool_choice=choice)
    schema = json.loads(parsed.request.settings.constraint.value)
    items = schema["items"].get("anyOf", [schema["items"]])
    assert {item["properties"]["name"]["const"] for item in items} == names
    assert ("maxItems" in schema) == at_most_one and not parsed.request.settings.constraint.or_text


def test_auto_allows_text_and_none_or_no_tools_constrains_nothing():
    assert chat(tools=[WEATHER]).request.settings.constraint.or_text
    assert chat(tools=[WEATHER], tool_choice="none").request.settings.constraint is None
    assert chat(tool_choice="auto").tools is None
    single = chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert json.loads(single.request.settings.constraint.value)["maxItems"] == 1


def test_the_tools_join_the_system_message_and_a_round_trip_renders_as_text():
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "user", "content": "And so?"}], "tools": [WEATHER]}
    conversation = openai_protocol.parse(body, "chat", LIMITS, extra_parameters=None).request.conversation
    assert [m.role for m in conversation] == ["system", "user", "assistant", "user"]
    assert conversation[0].content.startswith("Be brief.\n\nYou can call these functions") and "get_weather" in \
        conversation[0].content
    assert json.loads(conversation[2].content) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    results, question = conversation[3].content.split("\n\n")
    assert results.splitlines()[0] == RESULTS_HEADER and question == "And so?"
    assert json.loads(results.splitlines()[1]) == {"call_id": "call_1", "name": "get_weather", "content": "22 C"}


def test_errors_after_a_merged_turn_name_the_callers_message():
    body = {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_time"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "noon"},
        {"role": "tool", "tool_call_id": "c", "content": "noon"},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "again"}], "tools": [TIME]}
    with pytest.raises(InvalidRequest) as caught:
        openai_protocol.parse(body, "chat", LIMITS, extra_parameters=None)
    assert caught.value.param == "messages[5].role", caught.value.message


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{bad"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": "no"}, "messages[1].tool_calls"),
])
def test_broken_tool_calls_in_the_history_are_a_400_naming_them(message, param):
    body = {"messages": [{"role": "user", "content": "x"}, message, {"role": "user", "content": "y"}]}
    with pytest.raises(InvalidRequest) as caught:
        openai_protocol.parse(body, "chat", LIMITS, extra_parameters=None)
    assert caught.value.param == param


def test_calls_are_read_back_with_ids_and_cut_short_calls_stay_text():
    tool_use = parse_tool_use({"tools": [WEATHER], "tool_choice": "required"})
    (call,) = read_calls('[{"name": "get_weather", "arguments": {"city": "Lyon"}}]', tool_use)
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Lyon"}'}
    assert read_calls('[{"name": "get_weather", "argu', tool_use) is None
    assert read_calls("Sunny.", tool_use) is None


def test_an_answer_of_calls_renders_as_tool_calls_on_both_shapes():
    parsed = chat(tools=[WEATHER], tool_choice="required")
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    completion = Completion(text=text, prompt_token_ids=(1,), token_ids=(5, 2), finish_reason="stop")
    choice = openai_protocol.render(parsed, [completion], "r")["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    chunks = openai_protocol.Chunks(parsed, "r")
    events = chunks.piece(Piece(0, text)) + chunks.piece(Piece(0, "", completion=completion)) + chunks.end()
    chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # held: no text went out
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_stream_holds_text_back_only_while_it_may_be_calls():
    auto = openai_protocol.CallBuffer(chat(tools=[WEATHER]))
    assert not auto.holds("") and not auto.holds("Sunny") and not auto.holds("[x")
    calls = openai_protocol.CallBuffer(chat(tools=[WEATHER]))
    assert calls.holds("[") and calls.holds("Sunny")
    assert not openai_protocol.CallBuffer(chat()).holds("[")


def test_schemas_openai_describes_response_format_and_tool_call_answers():
    from jsonschema import Draft202012Validator

    from mixtral_endpoint.protocol.constraints import RESPONSE_FORMAT_SCHEMA
    from mixtral_endpoint.protocol.validation import load_schema

    openai = load_schema("openai")
    assert openai["$defs"]["response_format"] == RESPONSE_FORMAT_SCHEMA  # one fact: protocol/constraints.py's
    parsed = chat(tools=[WEATHER], tool_choice="required")
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    completion = Completion(text=text, prompt_token_ids=(1,), token_ids=(5, 2), finish_reason="stop")
    Draft202012Validator({**openai, "$ref": "#/$defs/chat_completion"}).validate(
        openai_protocol.render(parsed, [completion], "r"))
    Draft202012Validator({**openai, "$ref": "#/$defs/chat_request"}).validate(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"}], "tools": [WEATHER], "tool_choice": "auto"})


def nested(levels: int, leaf: dict | None = None) -> dict:
    """An object schema `levels` objects deep, each property required: {"a": {"a": ... leaf}}."""
    schema = leaf or {"type": "string", "maxLength": 3}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def items_deep(depth: int) -> dict:
    """A schema nested exactly `depth` objects and arrays deep, through `items` (jsonschema's costliest level)."""
    schema: dict = {"const": "x"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize(("body", "param", "limit"), [
    ({"response_format": {"type": "regex", "regex": "a" * (MAX_REGEX_CHARS + 1)}}, "response_format.regex",
     MAX_REGEX_CHARS),
    ({"response_format": {"type": "choice", "choice": [str(i) for i in range(MAX_CHOICES + 1)]}},
     "response_format.choice", MAX_CHOICES),
    ({"response_format": {"type": "choice", "choice": ["ok", "😀" * (MAX_CHOICE_CHARS + 1)]}},
     "response_format.choice[1]", MAX_CHOICE_CHARS),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(200)}}},
     "response_format.json_schema.schema", MAX_SCHEMA_DEPTH),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": items_deep(
        MAX_SCHEMA_DEPTH + 1)}}}, "response_format.json_schema.schema", MAX_SCHEMA_DEPTH),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": ["x" * MAX_SCHEMA_BYTES]}}}}, "response_format.json_schema.schema", MAX_SCHEMA_BYTES),
    ({"tools": [tool("deep", nested(200))]}, "tools[0].function.parameters", MAX_SCHEMA_DEPTH),
    ({"tools": [tool(f"f{i}", {"type": "object"}) for i in range(MAX_TOOLS + 1)]}, "tools", MAX_TOOLS),
    ({"tools": [tool(f"f{i}", {"enum": ["x" * (MAX_SCHEMA_BYTES // 4)]}) for i in range(5)]}, "tools",
     MAX_SCHEMA_BYTES),
])
def test_what_one_constraint_may_hold_is_bounded_by_a_400_naming_field_and_limit(body, param, limit):
    """Deep, huge or many: refused before jsonschema or the grammar compiler sees it (a schema 200 deep
    was a RecursionError, a 500)."""
    with pytest.raises(InvalidRequest) as caught:
        chat(**body)
    assert caught.value.param == param and str(limit) in caught.value.message, caught.value.message


def test_a_lone_surrogate_in_a_choice_or_regex_is_a_400():
    """No UTF-8 text holds one, so no answer could match it."""
    for response_format, param in [({"type": "choice", "choice": ["a", "\ud83d"]}, "response_format.choice[1]"),
                                   ({"type": "regex", "regex": "x\udc00"}, "response_format.regex")]:
        with pytest.raises(InvalidRequest) as caught:
            chat(response_format=response_format)
        assert caught.value.param == param and "surrogate" in caught.value.message


def test_a_schema_at_the_depth_limit_is_checked_with_the_stack_a_server_thread_has_used():
    """jsonschema recurses about ten frames a level; the limit leaves room for the server's own frames."""
    def from_deep_stack(frames: int) -> None:
        if frames:
            return from_deep_stack(frames - 1)
        check_schema(items_deep(MAX_SCHEMA_DEPTH), "s")
        check_schema(nested(MAX_SCHEMA_DEPTH // 2 - 1), "s")  # the deepest nesting of objects the limit allows
        check_schema({"type": "object", "properties": {"p": items_deep(MAX_SCHEMA_DEPTH - 2)}}, "s")

    from_deep_stack(300)
    with pytest.raises(InvalidRequest):
        check_schema(nested(MAX_SCHEMA_DEPTH // 2), "s")


def test_a_required_property_the_schema_does_not_declare_is_refused():
    """xgrammar drops `required` for an undeclared property, so `{}` would answer a schema it fails."""
    schema = {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["a"]}
    with pytest.raises(InvalidRequest) as caught:
        check_schema({"type": "object", "properties": {"x": schema}}, "response_format.json_schema.schema")
    assert caught.value.param == "response_format.json_schema.schema.properties.x"
    assert "'required of a property that properties does not declare'" in caught.value.message
    check_schema({**schema, "properties": {"a": {"type": "string"}}}, "s")  # declared: served
