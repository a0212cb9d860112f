"""The OpenAI and Azure AI Model Inference routes on the same azmlinfsrv, driven by the real clients:
the OpenAI SDK, azure-ai-inference and LangChain. Greedy answers equal /score's for the same input."""

from __future__ import annotations

import json

import pytest
import requests
from azure.ai.inference import ChatCompletionsClient
from azure.ai.inference.models import SystemMessage, UserMessage
from azure.core.credentials import AzureKeyCredential
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from langchain_openai import ChatOpenAI
from openai import BadRequestError, OpenAI

from mixtral_endpoint.doors.openai.protocol import MODEL_NAME, parse
from mixtral_endpoint.protocol.errors import ScoringError
from mixtral_endpoint.protocol.request import RequestLimits
from mixtral_endpoint.protocol.validation import load_schema

SECRET = "Zyzzyva-prompt-text"
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is so great about Paris?"}]
LIMITS = RequestLimits(max_new_tokens=64, default_max_new_tokens=16, max_prompts=4)


def score(server: str, input_string: list, **parameters: object) -> object:
    body = {"input_data": {"input_string": input_string}, "parameters": {"return_token_ids": True, **parameters}}
    response = requests.post(server + "/score", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(server: str) -> OpenAI:
    return OpenAI(base_url=server + "/v1", api_key="unused-locally", max_retries=0)


def test_chat_completion_equals_score(client: OpenAI, server: str):
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CONVERSATION, temperature=0, max_tokens=12)
    expected = score(server, CONVERSATION, max_new_tokens=12)
    assert chat.object == "chat.completion" and chat.model == MODEL_NAME
    assert chat.choices[0].message.content == expected["output"]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == expected["finish_reason"]
    assert chat.usage.model_dump() == {**expected["usage"], "completion_tokens_details": None,
                                       "prompt_tokens_details": None}


def test_chat_stream_adds_up_to_the_same_answer_and_ends_with_usage(client: OpenAI, server: str):
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CONVERSATION, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    expected = score(server, CONVERSATION, max_new_tokens=12)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["output"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == expected["usage"]["total_tokens"]


def test_completions_give_one_choice_per_prompt_as_score_does(client: OpenAI, server: str):
    prompts = ["Once upon a time", "The capital of France is"]
    completion = client.completions.create(model=MODEL_NAME, prompt=prompts, temperature=0, max_tokens=8)
    expected = score(server, prompts, max_new_tokens=8)
    assert completion.object == "text_completion"
    assert [c.text for c in completion.choices] == [row["0"] for row in expected]
    assert completion.usage.completion_tokens == sum(row["usage"]["completion_tokens"] for row in expected)


def test_seeded_sampling_is_reproducible_and_equals_score(client: OpenAI, server: str):
    ask = {"model": MODEL_NAME, "messages": CONVERSATION, "temperature": 0.8, "top_p": 0.9, "seed": 5, "max_tokens": 16}
    first = client.chat.completions.create(**ask).choices[0].message.content
    assert client.chat.completions.create(**ask).choices[0].message.content == first
    expected = score(server, CONVERSATION, do_sample=True, temperature=0.8, top_p=0.9, seed=5, max_new_tokens=16)
    assert first == expected["output"]


def test_models_and_model_info(client: OpenAI, server: str):
    (model,) = client.models.list().data
    assert model.id == MODEL_NAME and model.root == MODEL_NAME and model.max_model_len == 512  # vLLM's fields
    info = ChatCompletionsClient(endpoint=server, credential=AzureKeyCredential("unused")).get_model_info()
    assert (info.model_name, info.model_type) == (MODEL_NAME, "chat-completion")


def test_azure_ai_inference_client_gets_the_same_answer(server: str):
    azure = ChatCompletionsClient(endpoint=server, credential=AzureKeyCredential("unused"))
    messages = [SystemMessage(content="Be brief."), UserMessage(content="What is so great about Paris?")]
    answer = azure.complete(messages=messages, temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == score(server, CONVERSATION, max_new_tokens=12)["output"]
    # model_extras go through with extra-parameters: pass-through, which the client sets itself.
    extra = azure.complete(messages=messages, temperature=0, max_tokens=12, model_extras={"repetition_penalty": 1.5})
    assert extra.choices[0].message.content == score(server, CONVERSATION, max_new_tokens=12,
                                                     repetition_penalty=1.5)["output"]


def test_langchain_chat_openai_gets_the_same_answer(server: str):
    llm = ChatOpenAI(base_url=server + "/v1", api_key="unused", model=MODEL_NAME, temperature=0, max_tokens=12,
                     max_retries=0)
    reply = llm.invoke([("system", "Be brief."), ("user", "What is so great about Paris?")])
    assert reply.content == score(server, CONVERSATION, max_new_tokens=12)["output"]


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"if": {"type": "string"}}}}}}]}, "tools[0].function.parameters.properties.a"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": SECRET}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format.json_schema.schema.properties.a.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"n": 17}, "n"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": SECRET}, {"role": "user", "content": SECRET}]}, "messages[1].role"),
    ({"messages": [{"role": "tool", "content": SECRET}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"stop": [SECRET] * 17}, "stop"),
])
def test_what_mixtral_cannot_do_is_a_400_naming_the_openai_field(client: OpenAI, body: dict, param: str):
    request = {"model": MODEL_NAME, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 4, **body}
    extra = {k: request.pop(k) for k in list(request) if k == "top_k"}
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(**request, extra_body=extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and SECRET not in json.dumps(error)


def test_the_extra_parameters_header_decides_for_ours(server: str):
    """Without the header our extras are taken, as vLLM's server and Azure's catalog container take them
    (`vllm bench serve` sends repetition_penalty and ignore_eos with no header); `error` refuses them."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "top_k": 1}
    url = server + "/chat/completions?api-version=2024-05-01-preview"
    taken = requests.post(url, json={**body, "repetition_penalty": 1.1, "ignore_eos": True}, timeout=60)
    assert taken.status_code == 200 and taken.json()["usage"]["completion_tokens"] == 6
    refused = requests.post(url, json=body, headers={"extra-parameters": "error"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"
    # OpenAI's own bookkeeping fields are not extras: accepted, and they change nothing.
    dropped = requests.post(url, json={**body, "ignore_eos": True, "store": False, "metadata": {"a": "b"}},
                            headers={"extra-parameters": "drop"}, timeout=60)
    passed = requests.post(url, json=body, headers={"extra-parameters": "pass-through"}, timeout=60)
    assert dropped.status_code == passed.status_code == 200
    unknown = requests.post(url, json={**body, "mirostat": 1}, headers={"extra-parameters": "pass-through"}, timeout=60)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "mirostat"


def test_errors_keep_the_openai_shape_for_every_status(server: str):
    url = server + "/v1/chat/completions"
    broken = requests.post(url, data=b'{"messages": [', timeout=30)
    huge = requests.post(url, data=b"x" * 70_000, timeout=30)
    for response, status in ((broken, 400), (huge, 413)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_routes_are_served_with_azmlinfsrvs_request_ids(server: str):
    response = requests.get(server + "/v1/models", headers={"x-request-id": "trace-me"}, timeout=30)
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-me"
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions"):
        assert requests.post(server + path, json={}, timeout=30).status_code == 400, path
    assert requests.get(server + "/info", timeout=30).json()["model_name"] == MODEL_NAME


FINITE = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or infinity
JSON = st.recursive(st.none() | st.booleans() | st.integers() | FINITE | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FIELDS = st.sampled_from(["messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "stop", "seed", "stream", "stream_options", "n", "logprobs", "tools", "tool_choice",
                          "parallel_tool_calls", "response_format", "top_k", "model"])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                 "content": st.text(max_size=6) | JSON})
BODIES = st.dictionaries(FIELDS, JSON, max_size=5) | st.builds(
    lambda messages, rest: {"messages": messages, **rest}, st.lists(MESSAGE, max_size=3),
    st.dictionaries(FIELDS, JSON, max_size=3)) | JSON


@settings(max_examples=1500, deadline=None)
@given(body=BODIES, route=st.sampled_from(["chat", "completions"]),
       header=st.sampled_from([None, "error", "drop", "pass-through", "bogus"]))
def test_fuzz_openai_bodies_are_parsed_or_refused_with_a_typed_error(body: object, route: str, header: str | None):
    try:
        parse(body, route, LIMITS, extra_parameters=header)
    except ScoringError as exc:
        assert exc.status == 400 and exc.message


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzz_a_live_server_answers_openai_bodies_with_200_or_a_4xx_in_the_openai_shape(server: str, body: object,
                                                                                       path: str):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4)
    response = requests.post(server + path, json=body, timeout=60)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def openai_schema(name: str) -> Draft202012Validator:
    return Draft202012Validator({**load_schema("openai"), "$ref": f"#/$defs/{name}"})


def test_every_route_answers_what_schemas_openai_describes(server: str):
    chat = {"messages": CONVERSATION, "max_tokens": 6, "temperature": 0}
    completion = {"prompt": ["Once upon a time", "x"], "max_tokens": 6}
    for name, body in (("chat_request", chat), ("completion_request", completion)):
        openai_schema(name).validate(body)
    answers = [("chat_completion", requests.post(server + "/v1/chat/completions", json=chat, timeout=60)),
               ("text_completion", requests.post(server + "/completions", json=completion, timeout=60)),
               ("model_list", requests.get(server + "/v1/models", timeout=30)),
               ("model_info", requests.get(server + "/info", timeout=30)),
               ("error_response", requests.post(server + "/v1/chat/completions", json={"n": 3}, timeout=30))]
    for name, response in answers:
        openai_schema(name).validate(response.json())


def test_the_cores_own_errors_name_the_openai_field(client: OpenAI):
    """The core refuses a prompt over the context window; the door's fields name it, never /score's paths."""
    long = "word " * 600  # over the test server's 512-token window
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": long}], max_tokens=4)
    assert caught.value.body["param"] == "messages"
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt=["hi", long], max_tokens=4)
    assert caught.value.body["param"] == "prompt[1]"
