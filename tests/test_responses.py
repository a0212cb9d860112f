"""The OpenAI Responses API (`POST /v1/responses`) on a live azmlinfsrv on each engine, driven by the real
clients: openai-python's `responses.create` (string input, items, instructions, streamed events, a forced
function call, structured text, a tool round trip) and LangChain's `ChatOpenAI(use_responses_api=True)`.
Greedy answers equal the chat route's for the same conversation. The parser's refusals are a table, pure;
stored responses are refused saying why."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseTextDeltaEvent,
)
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from mixtral_endpoint.doors.openai import protocol as openai_protocol
from mixtral_endpoint.doors.responses import protocol, routes
from mixtral_endpoint.protocol.config import MODEL_NAME
from mixtral_endpoint.protocol.errors import ScoringError
from mixtral_endpoint.protocol.request import Completion, RequestLimits
from mixtral_endpoint.serving.service import Scorer

SECRET = "Zyzzyva-prompt-text"
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is so great about Paris?"}]
LIMITS = RequestLimits(max_new_tokens=64, default_max_new_tokens=16, max_prompts=4)
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Lyon"]}, "unit": {"enum": ["C", "F"]}}}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER,
        "strict": True}


class Place(BaseModel):
    """A city to visit (bounded, so the tiny model's random text ends within max_output_tokens)."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Lyon", "Nice"]
    rank: int = Field(ge=1, le=99)
    note: str = Field(max_length=8)


@pytest.fixture(scope="module")
def url(any_server: tuple[str, object]) -> str:
    return any_server[0]


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused-locally", max_retries=0)


def chat(client: OpenAI, messages: list[dict], **kwargs: object) -> tuple[str, str, object]:
    """The chat route's greedy answer: its text, finish reason and usage."""
    answer = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=12,
                                            **kwargs)
    return answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage


def successes(url: str) -> float:
    metrics = requests.get(url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
               if sample.name == "vllm:request_success_total")


def test_string_input_with_instructions_equals_the_chat_answer_and_is_counted(client: OpenAI, url: str):
    before = successes(url)
    response = client.responses.create(model=MODEL_NAME, input=CONVERSATION[1]["content"], instructions="Be brief.",
                                       temperature=0, max_output_tokens=12, store=False, metadata={"a": "b"})
    text, reason, usage = chat(client, CONVERSATION)
    assert response.object == "response" and response.model == MODEL_NAME and response.id.startswith("resp_")
    assert response.output_text == text and isinstance(response.output[0], ResponseOutputMessage)
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert response.status == ("incomplete" if reason == "length" else "completed")
    assert response.metadata == {"a": "b"} and response.instructions == "Be brief."
    assert successes(url) == before + 2  # the chat answer counted too: the core counts every door


def test_items_with_text_parts_equal_the_chat_answer(client: OpenAI):
    items = [{"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
             {"role": "user", "content": "Hi"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello.",
                                                                    "annotations": []}]},
             {"role": "user", "content": [{"type": "input_text", "text": "What is "},
                                          {"type": "input_text", "text": "so great about Paris?"}]}]
    response = client.responses.create(model=MODEL_NAME, input=items, temperature=0, max_output_tokens=12)
    messages = [CONVERSATION[0], {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                CONVERSATION[1]]
    assert response.output_text == chat(client, messages)[0]


def test_a_length_cut_is_incomplete_with_max_output_tokens(client: OpenAI):
    response = client.responses.create(model=MODEL_NAME, input="Count to a hundred.", max_output_tokens=3,
                                       extra_body={"ignore_eos": True, "seed": 1})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"


def test_stream_sends_the_sdks_events_in_order_adding_up_to_the_answer(client: OpenAI):
    ask = {"model": MODEL_NAME, "input": CONVERSATION[1]["content"], "instructions": "Be brief.", "temperature": 0,
           "max_output_tokens": 12}
    events = list(client.responses.create(**ask, stream=True))
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert isinstance(events[0], ResponseCreatedEvent) and kinds[1] == "response.in_progress"
    opened = ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    closed = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[2:5] == opened and kinds[-4:-1] == closed
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    text = "".join(event.delta for event in events if isinstance(event, ResponseTextDeltaEvent))
    assert text == client.responses.create(**ask).output_text == events[-1].response.output_text
    assert kinds[-1] in ("response.completed", "response.incomplete")


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_validates_against_its_schema(client: OpenAI, stream: bool):
    ask = {"model": MODEL_NAME, "input": "What is the weather in Paris?", "tools": [TOOL], "max_output_tokens": 64,
           "tool_choice": {"type": "function", "name": "get_weather"}}
    if stream:
        events = list(client.responses.create(**ask, stream=True))
        deltas = [e for e in events if isinstance(e, ResponseFunctionCallArgumentsDeltaEvent)]
        (done,) = [e for e in events if isinstance(e, ResponseFunctionCallArgumentsDoneEvent)]
        assert "".join(d.delta for d in deltas) == done.arguments
        assert isinstance(events[-1], ResponseCompletedEvent)
        response = events[-1].response
    else:
        response = client.responses.create(**ask)
    (call,) = response.output
    assert isinstance(call, ResponseFunctionToolCall) and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_text_format_json_schema_holds_the_text_to_its_schema(client: OpenAI):
    schema = Place.model_json_schema()
    response = client.responses.create(model=MODEL_NAME, input="Which French city should I visit?",
                                       max_output_tokens=64, extra_body={"seed": 2},
                                       text={"format": {"type": "json_schema", "name": "place", "schema": schema,
                                                        "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)
    parsed = client.responses.parse(model=MODEL_NAME, input="Which city?", text_format=Place, max_output_tokens=64)
    assert isinstance(parsed.output_parsed, Place)


def test_a_tool_round_trip_answers_as_the_chat_route_does(client: OpenAI):
    """A forced call, its output sent back as a function_call_output item, then a greedy answer: the chat
    route's, for the same conversation with tool_calls and a tool message."""
    question = {"role": "user", "content": "What is the weather in Paris?"}
    called = client.responses.create(model=MODEL_NAME, input=[question], tools=[TOOL], max_output_tokens=64,
                                     tool_choice="required", parallel_tool_calls=False)
    (call,) = called.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 C in Paris"}
    answer = client.responses.create(model=MODEL_NAME, input=[question, *called.output, result], tools=[TOOL],
                                     temperature=0, max_output_tokens=12)
    assert answer.output and all(item.type in ("message", "function_call") for item in answer.output)
    tools = [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]}
    chat_answer = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=12, tools=tools,
        messages=[question, assistant, {"role": "tool", "tool_call_id": call.call_id, "content": "22 C in Paris"}])
    message = chat_answer.choices[0].message
    if message.tool_calls:
        assert [(i.name, json.loads(i.arguments)) for i in answer.output] == [
            (c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    else:
        assert answer.output_text == message.content


def test_langchain_responses_api_invoke_and_stream_equal_the_chat_answer(client: OpenAI, url: str):
    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL_NAME, temperature=0, max_tokens=12,
                     max_retries=0, use_responses_api=True)
    messages = [("system", "Be brief."), ("user", "What is so great about Paris?")]
    expected = chat(client, CONVERSATION)[0]
    reply = llm.invoke(messages)
    assert reply.text == expected and reply.response_metadata["status"] in ("completed", "incomplete")
    assert "".join(chunk.text for chunk in llm.stream(messages)) == expected


def test_langchain_bind_tools_round_trip_over_the_responses_api(url: str):
    """LangChain replays the call it got as a function_call item and the ToolMessage as its output."""
    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL_NAME, max_tokens=64, max_retries=0,
                     use_responses_api=True, temperature=0.7, extra_body={"seed": 1})
    question = HumanMessage("What is the weather in Paris?")
    called = llm.bind_tools([TOOL], tool_choice="get_weather").invoke([question])
    (call,) = called.tool_calls
    jsonschema.validate(call["args"], WEATHER)
    result = ToolMessage("22 C in Paris", tool_call_id=call["id"])
    answer = llm.bind_tools([TOOL]).invoke([question, called, result])
    assert answer.text or answer.tool_calls


def test_stored_responses_are_refused_saying_why(client: OpenAI, url: str):
    with pytest.raises(BadRequestError) as caught:
        client.responses.create(model=MODEL_NAME, input="Hi", previous_response_id="resp_1", max_output_tokens=4)
    assert caught.value.body["param"] == "previous_response_id" and "load balancer" in caught.value.body["message"]
    with pytest.raises(NotFoundError) as caught:
        client.responses.retrieve("resp_1")
    assert "load balancer" in caught.value.body["message"] and caught.value.body["code"] == "not_found"
    assert requests.delete(url + "/responses/resp_1", timeout=30).status_code == 404
    kept = client.responses.create(model=MODEL_NAME, input="Hi", store=True, max_output_tokens=2)
    assert kept.store is False  # taken, and said: nothing was kept


def test_a_stream_whose_caller_goes_away_cancels_its_row(any_scorer: Scorer):
    body = {"input": "hi", "max_output_tokens": 64, "stream": True, "ignore_eos": True}
    parsed = protocol.parse(body, any_scorer.config.limits)
    events = any_scorer.stream(parsed.request, "test")
    chunks = routes._events(parsed, events, "test", 0)
    assert "response.created" in next(chunks)
    chunks.close()  # the server's write failed: the caller has gone
    assert events.row.done.wait(30) and events.row.finish_reason == "cancelled"
    assert len(events.row.tokens) < 64


def test_items_render_the_chat_doors_conversation_token_for_token():
    """instructions, a function_call and its output, and user text after it: the same conversation (and
    constraint) as the chat body that says the same."""
    items = [{"role": "user", "content": "Hi"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "22 C"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "19 C"}]},
             {"role": "user", "content": "So?"}]
    ours = protocol.parse({"input": items, "instructions": "Be brief.", "tools": [TOOL], "temperature": 0}, LIMITS)
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items[1:3]]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
                {"role": "tool", "tool_call_id": "c2", "content": "19 C"}, {"role": "user", "content": "So?"}]
    tools = [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    theirs = openai_protocol.parse({"messages": messages, "tools": tools, "temperature": 0}, "chat", LIMITS,
                                   extra_parameters=None)
    assert ours.request.conversation == theirs.request.conversation
    assert ours.request.settings == theirs.request.settings


def test_a_length_cut_renders_incomplete_and_calls_render_as_function_call_items():
    parsed = protocol.parse({"input": "Hi", "tools": [TOOL], "tool_choice": "required"}, LIMITS)
    cut = Completion('[{"name": "get_weather", "argu', (1, 2), (3, 4), "length")
    response = protocol.render(parsed, cut, "r", 0)
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["type"] == "message"
    whole = Completion('[{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "C"}}]', (1,), (3,), "stop")
    (call,) = protocol.render(parsed, whole, "r", 0)["output"]
    assert (call["type"], call["name"], json.loads(call["arguments"])) == (
        "function_call", "get_weather", {"city": "Lyon", "unit": "C"})


@pytest.mark.parametrize(("body", "param"), [
    ({"input": 5}, "input"),
    ({"input": ""}, "input"),
    ({"input": [{"role": "user", "content": SECRET}, {"role": "user", "content": SECRET}]}, "input[1].role"),
    ({"input": [{"role": "boss", "content": SECRET}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": {"a": 1}}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": SECRET, "colour": 1}]}, "input[0].colour"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "function_call", "call_id": "c", "name": "f",
                                                    "arguments": "[1]"}]}, "input[1].arguments"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[1].call_id"),
    ({"instructions": 5}, "instructions"),
    ({"instructions": "\ud800"}, "instructions"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": "5"}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stream": "yes"}, "stream"),
    ({"store": 1}, "store"),
    ({"model": 5}, "model"),
    ({"user": ["x"]}, "user"),
    ({"metadata": {"a": 1}}, "metadata.a"),
    ({"metadata": "x"}, "metadata"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
    ({"tools": [{"type": "computer_use_preview"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "name": "f g"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "description": 5}]}, "tools[0].description"),
    ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools[0].strict"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "a": {"if": {"type": "string"}}}}}]}, "tools[0].parameters.properties.a"),
    ({"tools": [TOOL, TOOL]}, "tools[1].name"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": SECRET}}, "tool_choice.name"),
    ({"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"tools": [TOOL], "tool_choice": "maybe"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"text": "json"}, "text"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}}, "text.format.schema.properties.a.type"),
    ({"text": {"format": {"type": "json_schema", "schema": {}, "json_schema": {}}}}, "text.format.json_schema"),
    ({"text": {"format": {"type": "json_object"}, "colour": 1}}, "text.colour"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"mirostat": 1}, "mirostat"),
    ({"top_k": -1}, "top_k"),
])
def test_bad_input_is_a_400_naming_the_responses_field(body: dict, param: str):
    with pytest.raises(ScoringError) as caught:
        protocol.parse({"model": MODEL_NAME, "input": [{"role": "user", "content": SECRET}], **body}, LIMITS)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message
    assert SECRET not in caught.value.message


FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | FINITE | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FIELDS = st.sampled_from(["input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
                          "parallel_tool_calls", "stream", "store", "text", "metadata", "user", "include", "model",
                          "previous_response_id", "reasoning", "truncation", "top_k", "seed"])
ITEM = st.fixed_dictionaries({"type": st.sampled_from(["message", "function_call", "function_call_output", "x"]),
                              "role": st.sampled_from(["user", "assistant", "developer", 3]),
                              "content": st.text(max_size=6) | JSON, "call_id": JSON, "name": JSON,
                              "arguments": JSON, "output": JSON})
BODIES = st.dictionaries(FIELDS, JSON, max_size=5) | st.builds(
    lambda items, rest: {"input": items, **rest}, st.lists(ITEM, max_size=3), st.dictionaries(FIELDS, JSON, max_size=3))


@settings(max_examples=300, deadline=None)
@given(body=BODIES)
def test_fuzz_responses_bodies_are_parsed_or_refused_with_a_typed_error(body: dict):
    try:
        protocol.parse(body, LIMITS)
    except ScoringError as exc:
        assert exc.status == 400 and exc.message
