"""Streams that carry log-probabilities and several answers, on each engine, as vLLM's OpenAI server sends them:
each chunk's log-probabilities are those of the tokens whose text it carries, and over the chunks they equal
the whole answer's; echo's prompt goes out first; n answers (of several prompts) each stream under their own
index with their own role chunk and finish reason, and usage sums them all; the role chunk waits for the first
token; screening that withholds text withholds its log-probabilities. Through the core and the door's own event
writer, and through the OpenAI SDK against a live azmlinfsrv."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from mixtral_endpoint.doors.openai import protocol as openai
from mixtral_endpoint.doors.openai import routes
from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import MODEL_NAME
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.serving.service import Scorer

from .fake_content_safety import FakeContentSafety
from .test_safety import screened_scorer

CHAT = [{"role": "user", "content": "What is so great about Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}}, "required": ["city"]}}}


def parse(scorer: Scorer, body: dict[str, Any], route: openai.Route) -> openai.OpenAIRequest:
    return openai.parse({"model": MODEL_NAME, **body}, route, scorer.config.limits, extra_parameters=None)


def whole(scorer: Scorer, body: dict[str, Any], route: openai.Route) -> dict[str, Any]:
    parsed = parse(scorer, body, route)
    return openai.render(parsed, scorer.complete(parsed.request, "test"), "test")


def streamed(scorer: Scorer, body: dict[str, Any], route: openai.Route) -> list[dict[str, Any]]:
    """The chunks of the same body streamed, as the route sends them."""
    parsed = parse(scorer, {**body, "stream": True}, route)
    events = "".join(routes._events(parsed, scorer.stream(parsed.request, "test"), "test"))
    assert events.endswith("data: [DONE]\n\n") and '"error"' not in events, events[-500:]
    return [json.loads(e[len("data: "):]) for e in events.split("\n\n") if e.startswith("data: {")]


def close(actual: Any, expected: Any) -> bool:
    """Equal, log-probabilities within 1e-4: a row that ends on a stop string may still share the engine's next
    step with the following request's, and a float32 sum in another batch differs in its last bits."""
    if isinstance(expected, float) and isinstance(actual, float):
        return abs(actual - expected) < 1e-4
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(close(actual[k], expected[k]) for k in expected)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(close(a, e) for a, e in zip(actual, expected, strict=True))
    return actual == expected


def choices(chunks: list[dict[str, Any]], index: int) -> Iterator[dict[str, Any]]:
    return (c for chunk in chunks for c in chunk["choices"] if c["index"] == index)


def chat_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for c in choices(chunks, index))


def chat_logprobs(chunks: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    return [entry for c in choices(chunks, index) if c["logprobs"] for entry in c["logprobs"]["content"]]


def completion_logprobs(chunks: list[dict[str, Any]], index: int = 0) -> dict[str, list]:
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in choices(chunks, index):
        for key in joined:
            joined[key] += (c["logprobs"] or {}).get(key, [])
    return joined


@pytest.mark.parametrize("stop", [None, ["e"]], ids=["no-stop", "stop-string"])
def test_streamed_chat_logprobs_are_the_whole_answers_chunk_by_chunk(any_scorer: Scorer, stop: list[str] | None):
    """Greedy: the chunks' text and log-probabilities add up to the unstreamed answer's (a stop string's held text
    included), and each chunk carries exactly the tokens whose text it sends."""
    body = {"messages": CHAT, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "stop": stop}
    expected = whole(any_scorer, body, "chat")["choices"][0]
    chunks = streamed(any_scorer, body, "chat")
    assert chat_text(chunks) == expected["message"]["content"]
    assert close(chat_logprobs(chunks), expected["logprobs"]["content"])
    carried = [c for c in choices(chunks, 0) if c["delta"].get("content")]
    for k, c in enumerate(carried):
        spelled = bytes(b for entry in c["logprobs"]["content"] for b in entry["bytes"]).decode(errors="replace")
        spelled = spelled.lstrip() if k == 0 else spelled
        if k < len(carried) - 1:
            assert spelled == c["delta"]["content"], k
        else:  # the last also carries the tokens of the stop string it cut
            assert spelled.startswith(c["delta"]["content"]), k
    assert [c["finish_reason"] for c in choices(chunks, 0)][-1] == expected["finish_reason"]


def test_streamed_completions_logprobs_are_the_whole_answers(any_scorer: Scorer):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "logprobs": 2}
    expected = whole(any_scorer, body, "completions")["choices"][0]
    chunks = streamed(any_scorer, body, "completions")
    assert "".join(c["text"] for c in choices(chunks, 0)) == expected["text"]
    assert close(completion_logprobs(chunks), expected["logprobs"])
    assert all(c["logprobs"] is None or len(c["logprobs"]["tokens"]) == len(c["logprobs"]["text_offset"])
               for c in choices(chunks, 0))


@pytest.mark.parametrize("max_tokens", [4, 0])
def test_echo_streams_the_prompt_and_its_logprobs_first(any_scorer: Scorer, max_tokens: int):
    """vLLM's shape: the first chunk holds the prompt (its first token's log-probability null); with max_tokens 0,
    the prompt alone."""
    ids = any_scorer.tokenizer.encode_text("The capital of France is Paris")
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "echo": True}
    answer = whole(any_scorer, body, "completions")
    expected = answer["choices"][0]
    chunks = streamed(any_scorer, {**body, "stream_options": {"include_usage": True}}, "completions")
    first = next(choices(chunks, 0))
    assert first["text"].startswith("The capital of France is Paris") and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) >= len(ids)
    assert "".join(c["text"] for c in choices(chunks, 0)) == expected["text"]
    assert close(completion_logprobs(chunks), expected["logprobs"])
    assert chunks[-1]["usage"] == answer["usage"]
    plain = streamed(any_scorer, {k: v for k, v in body.items() if k != "logprobs"}, "completions")
    assert next(choices(plain, 0))["text"].startswith("The capital of France is Paris")  # echo without logprobs
    assert "".join(c["text"] for c in choices(plain, 0)) == expected["text"]


def test_n_answers_of_several_prompts_stream_under_their_own_index_and_usage_sums_them(any_scorer: Scorer):
    body = {"prompt": ["Once upon a time", "The capital of France is"], "n": 2, "max_tokens": 6,
            "temperature": 0.9, "seed": 7, "logprobs": 1, "stream_options": {"include_usage": True}}
    answer = whole(any_scorer, body, "completions")
    chunks = streamed(any_scorer, body, "completions")
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == {0, 1, 2, 3}
    for i, expected in enumerate(answer["choices"]):  # answer i seeded seed + i, as unstreamed
        assert "".join(c["text"] for c in choices(chunks, i)) == expected["text"], i
        assert close(completion_logprobs(chunks, i), expected["logprobs"]), i
        assert [c["finish_reason"] for c in choices(chunks, i) if c["finish_reason"]] == [expected["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]


def test_n_chat_answers_each_get_a_role_chunk_a_finish_reason_and_their_logprobs(any_scorer: Scorer):
    body = {"messages": CHAT, "n": 2, "max_tokens": 8, "temperature": 0.9, "seed": 3, "logprobs": True,
            "stream_options": {"include_usage": True}}
    answer = whole(any_scorer, body, "chat")
    chunks = streamed(any_scorer, body, "chat")
    for i, expected in enumerate(answer["choices"]):
        mine = list(choices(chunks, i))
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert sum(c["delta"].get("role") == "assistant" for c in mine) == 1
        assert chat_text(chunks, i) == expected["message"]["content"]
        assert close(chat_logprobs(chunks, i), expected["logprobs"]["content"])
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [expected["finish_reason"]]
    assert chat_text(chunks, 0) != chat_text(chunks, 1)  # seed and seed + 1
    assert chunks[-1]["usage"] == answer["usage"] and answer["usage"]["completion_tokens"] == 16


def test_tool_calls_held_back_go_out_with_all_their_logprobs(any_scorer: Scorer):
    """Text that may be calls is held to the answer's end (as calls, or as text when cut short); its
    log-probabilities are held with it."""
    body = {"messages": CHAT, "max_tokens": 64, "temperature": 0, "logprobs": True, "tools": [WEATHER],
            "tool_choice": "required", "n": 2, "seed": 1}
    answer = whole(any_scorer, body, "chat")
    chunks = streamed(any_scorer, body, "chat")
    for i, expected in enumerate(answer["choices"]):
        mine = list(choices(chunks, i))
        (held,) = [c for c in mine if c["delta"].get("tool_calls") or c["delta"].get("content")]
        assert close(held["logprobs"]["content"], expected["logprobs"]["content"])
        assert all(c["logprobs"] is None for c in mine if c is not held)
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [expected["finish_reason"]]
        if expected["finish_reason"] == "tool_calls":
            names = [call["function"]["name"] for call in held["delta"]["tool_calls"]]
            assert names == [call["function"]["name"] for call in expected["message"]["tool_calls"]]
        else:
            assert held["delta"]["content"] == expected["message"]["content"]


def test_a_stream_of_n_answers_whose_caller_goes_away_cancels_every_row(any_scorer: Scorer):
    body = {"prompt": "Once upon a time", "n": 2, "max_tokens": 64, "ignore_eos": True, "logprobs": 1,
            "stream": True}
    parsed = parse(any_scorer, body, "completions")
    events = any_scorer.stream(parsed.request, "test")
    chunks = routes._events(parsed, events, "test")
    assert '"index"' in next(chunks)
    chunks.close()  # the server's write failed: the caller has gone
    for row in events.rows:
        assert row.done.wait(30) and row.finish_reason == "cancelled" and len(row.tokens) < 64


def test_a_stream_without_logprobs_sends_none(any_scorer: Scorer):
    chunks = streamed(any_scorer, {"messages": CHAT, "max_tokens": 4, "temperature": 0}, "chat")
    assert all(c["logprobs"] is None for chunk in chunks for c in chunk["choices"])


def test_the_role_chunk_goes_out_with_the_first_token_as_vllms(any_scorer: Scorer):
    """`vllm bench serve` takes the time to first token at the first chunk with choices: that chunk must not go
    out before the engine has made a token."""
    parsed = parse(any_scorer, {"messages": CHAT, "max_tokens": 4, "stream": True}, "chat")
    events = any_scorer.stream(parsed.request, "test")
    chunks = routes._events(parsed, events, "test")
    first = next(chunks)
    assert '"role": "assistant"' in first and events.row.first_token_at is not None
    assert "data: [DONE]" in "".join(chunks)


def test_score_streams_one_answer_its_events_carry_no_index(scorer: Scorer):
    for parameters, param in (({"n": 2}, "parameters.n"), ({}, "parameters.stream")):
        prompts = ["a"] if parameters else ["a", "b"]
        with pytest.raises(InvalidRequest) as caught:
            score_api.score(scorer, {"input_data": {"input_string": prompts},
                                     "parameters": {"stream": True, **parameters}}, stream_ok=True)
        assert caught.value.param == param


@pytest.fixture
def fake() -> Iterator[FakeContentSafety]:
    fake = FakeContentSafety()
    yield fake
    fake.close()


def test_a_stream_flagged_midway_withholds_the_logprobs_of_what_it_withholds(scorer: Scorer,
                                                                            fake: FakeContentSafety):
    core = screened_scorer(scorer, fake)
    fake.flag_after = 2  # the prompt and the first window pass; the second window is flagged
    body = {"messages": CHAT, "max_tokens": 200, "ignore_eos": True, "logprobs": True}
    chunks = streamed(core, body, "chat")
    text = chat_text(chunks)
    assert [c["finish_reason"] for c in choices(chunks, 0)][-1] == "content_filter"
    assert text == fake.calls[1]["text"]  # one screened window, no more
    spelled = bytes(b for entry in chat_logprobs(chunks) for b in entry["bytes"]).decode(errors="replace")
    assert spelled.lstrip() == text  # the released text's tokens, none of the withheld


def test_each_of_n_streamed_answers_is_screened_and_withheld_on_its_own(scorer: Scorer, fake: FakeContentSafety):
    core = screened_scorer(scorer, fake)
    fake.flag_after = 1  # the prompt passes; every answer's first window is flagged
    body = {"messages": CHAT, "n": 2, "max_tokens": 200, "ignore_eos": True, "logprobs": True, "seed": 1,
            "stream_options": {"include_usage": True}}
    chunks = streamed(core, body, "chat")
    for i in (0, 1):
        assert [c["finish_reason"] for c in choices(chunks, i) if c["finish_reason"]] == ["content_filter"]
        assert chat_text(chunks, i) == "" and chat_logprobs(chunks, i) == []
    assert chunks[-1]["usage"]["completion_tokens"] == 0


def test_the_openai_sdk_streams_logprobs_and_n(any_server):
    url, _ = any_server
    client = OpenAI(base_url=url + "/v1", api_key="unused-locally", max_retries=0)
    ask = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True,
           "top_logprobs": 2}
    expected = client.chat.completions.create(**ask).choices[0]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    content = [entry for chunk in chunks for c in chunk.choices if c.logprobs for entry in c.logprobs.content]
    assert close([e.model_dump() for e in content], [e.model_dump() for e in expected.logprobs.content])
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == expected.message.content
    several = list(client.chat.completions.create(**{**ask, "temperature": 0.8, "seed": 1}, n=2, stream=True,
                                                  stream_options={"include_usage": True}))
    assert {c.index for chunk in several for c in chunk.choices} == {0, 1}
    assert several[-1].usage.completion_tokens == 16
    echoed = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=3,
                                            temperature=0, logprobs=1, echo=True, stream=True))
    first = echoed[0].choices[0]
    assert first.text.startswith("Once upon a time") and first.logprobs.token_logprobs[0] is None
