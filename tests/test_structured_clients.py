"""Structured outputs and tool calls through the real clients, against a live azmlinfsrv on each engine: the
OpenAI SDK's `parse`, LangChain's `with_structured_output` (json_schema and function_calling) and
`bind_tools` (a whole round trip), azure-ai-inference's JSON schema format, and streamed tool calls.
Every answer parses and validates. The schemas are bounded (enums, integer ranges, maxLength), so the
tiny model's random text ends within max_tokens."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from azure.ai.inference import ChatCompletionsClient
from azure.ai.inference.models import JsonSchemaFormat, UserMessage
from azure.core.credentials import AzureKeyCredential
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

from mixtral_endpoint.protocol.config import MODEL_NAME

QUESTION = [{"role": "user", "content": "Which French city should I visit, and how much do you like it?"}]


class Place(BaseModel):
    """A city to visit."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Lyon", "Nice"]
    rank: int = Field(ge=1, le=99)
    note: str = Field(max_length=8)


@tool
def get_weather(city: Literal["Paris", "Lyon"], unit: Literal["C", "F"]) -> str:
    """The weather in a city."""
    return f"22 {unit} in {city}"


@pytest.fixture(scope="module")
def url(any_server: tuple[str, object]) -> str:
    return any_server[0]


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused-locally", max_retries=0)


def chat_model(url: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL_NAME, max_tokens=64, max_retries=0,
                      temperature=0.7, seed=1)


def test_openai_sdk_parse_gives_the_pydantic_model(client: OpenAI):
    completion = client.chat.completions.parse(model=MODEL_NAME, messages=QUESTION, response_format=Place,
                                               max_tokens=64, seed=2)
    assert isinstance(completion.choices[0].message.parsed, Place)
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(url: str, method: str):
    place = chat_model(url).with_structured_output(Place, method=method).invoke(QUESTION[0]["content"])
    assert isinstance(place, Place)


def test_langchain_bind_tools_round_trip(url: str):
    """A forced call, its result sent back, then an answer: text, or a call that validates."""
    llm = chat_model(url)
    question = HumanMessage("What is the weather in Paris?")
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    (call,) = called.tool_calls[:1]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], get_weather.tool_call_schema.model_json_schema())
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.bind_tools([get_weather]).invoke([question, called, result])
    if answer.tool_calls:
        assert all(c["name"] == "get_weather" for c in answer.tool_calls)
        assert answer.response_metadata["finish_reason"] == "tool_calls"
    else:
        assert isinstance(answer.content, str) and answer.content
        assert answer.response_metadata["finish_reason"] in ("stop", "length")


def test_azure_ai_inference_json_schema_format(url: str):
    schema = Place.model_json_schema()
    azure = ChatCompletionsClient(endpoint=url, credential=AzureKeyCredential("unused"))
    response = azure.complete(messages=[UserMessage(QUESTION[0]["content"])], max_tokens=64, seed=3,
                              response_format=JsonSchemaFormat(name="place", schema=schema, strict=True))
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_streamed_tool_calls_add_up_to_valid_calls(client: OpenAI):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                               "parameters": get_weather.tool_call_schema.model_json_schema()}}]
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=tools,
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                                                 stream=True, seed=4))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    for entry in calls.values():
        assert entry["id"] and entry["name"] == "get_weather"
        jsonschema.validate(json.loads(entry["arguments"]), tools[0]["function"]["parameters"])
