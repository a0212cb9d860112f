"""Core tier: a payload in, the response contract out, on the tiny Mixtral, on each engine."""

from __future__ import annotations

import io
import json
import logging
import shlex
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.engines.engine import Capacity, Row
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import ContextLengthExceeded, InvalidRequest, PayloadTooLarge
from mixtral_endpoint.protocol.request import Message
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.protocol.validation import load_schema
from mixtral_endpoint.serving.service import Scorer

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = Draft202012Validator(load_schema("response"))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Paris."}]


def text(*prompts: str, **parameters: object) -> dict:
    return {"input_data": {"input_string": list(prompts)}, "parameters": parameters}


def chat(**parameters: object) -> dict:
    return {"input_data": {"input_string": CHAT}, "parameters": parameters}


def test_sample_request_gets_a_valid_response(any_scorer: Scorer):
    payload = json.loads((ROOT / "sample-request.json").read_text())
    payload["parameters"]["max_new_tokens"] = 32  # the test server's cap is 64
    body = score_api.score(any_scorer, payload)
    RESPONSE.validate(body)
    assert body["messages"][-1]["content"] == body["output"]
    assert body["usage"]["completion_tokens"] == 32 and body["finish_reason"] == "length"


def test_chat_output_is_only_the_new_message(any_scorer: Scorer, tokenizer):
    body = score_api.score(any_scorer, chat(max_new_tokens=12, return_token_ids=True))
    RESPONSE.validate(body)
    assert "messages" not in body
    assert body["output"] == tokenizer.decode(body["token_ids"])
    assert body["prompt_token_ids"] == tokenizer.encode_chat([Message(**m) for m in CHAT])
    assert body["usage"]["prompt_tokens"] == len(body["prompt_token_ids"])


def test_text_prompts_get_one_row_each_in_order(any_scorer: Scorer):
    rows = score_api.score(any_scorer, text("Once upon a time", "The capital of France is", max_new_tokens=8))
    RESPONSE.validate(rows)
    assert len(rows) == 2
    singles = [score_api.score(any_scorer, text(p, max_new_tokens=8))[0]
               for p in ("Once upon a time", "The capital of France is")]
    assert rows == singles


def test_return_full_text_for_text_prompts_is_prompt_plus_completion(any_scorer: Scorer):
    plain = score_api.score(any_scorer, text("Once upon a time", max_new_tokens=8))[0]["0"]
    full = score_api.score(any_scorer, text("Once upon a time", max_new_tokens=8, return_full_text=True))[0]["0"]
    assert full == "Once upon a time" + plain


def test_stop_string_cuts_before_the_stop_text(any_scorer: Scorer):
    free = score_api.score(any_scorer, text("Once upon a time", max_new_tokens=24, return_token_ids=True))[0]
    words = free["0"].split()
    stop = words[2]
    cut = score_api.score(any_scorer, text("Once upon a time", max_new_tokens=24, stop=stop, return_token_ids=True))[0]
    assert cut["finish_reason"] == "stop"
    assert cut["0"] == free["0"][: free["0"].find(stop)]
    assert stop not in cut["0"]
    assert cut["usage"]["completion_tokens"] < free["usage"]["completion_tokens"]
    assert cut["token_ids"] == free["token_ids"][: len(cut["token_ids"])]


def test_stop_strings_that_never_appear_change_nothing(any_scorer: Scorer):
    free = score_api.score(any_scorer, text("Once upon a time", max_new_tokens=12))
    stops = ["@@never@@", "##no##"]
    assert score_api.score(any_scorer, text("Once upon a time", max_new_tokens=12, stop=stops)) == free


def test_seeded_sampling_is_reproducible_through_the_core(any_scorer: Scorer):
    request = chat(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=5, max_new_tokens=16)
    assert score_api.score(any_scorer, request) == score_api.score(any_scorer, request)


def test_prompt_plus_max_new_tokens_over_the_context_window(any_scorer: Scorer):
    # The test scorer's window is 512 tokens.
    with pytest.raises(ContextLengthExceeded) as caught:
        score_api.score(any_scorer, text("short", "word " * 600, max_new_tokens=8))
    assert caught.value.param == "input_data.input_string[1]"
    assert "512" in caught.value.message and caught.value.status == 400


def test_too_many_prompts_for_the_server_cap(any_scorer: Scorer):
    with pytest.raises(InvalidRequest, match="at most 4"):
        score_api.score(any_scorer, text(*["hi"] * 5))


def test_oversized_body_is_refused_before_parsing(any_scorer: Scorer):
    limit = any_scorer.config.max_body_bytes
    with pytest.raises(PayloadTooLarge, match=f"over {limit} bytes") as caught:
        any_scorer.read_json(io.BytesIO(b"{" * (limit + 1)))
    assert caught.value.status == 413


def test_a_body_declared_too_long_is_refused_before_it_is_read(any_scorer: Scorer):
    body = io.BytesIO(b'{"input_data": {"input_string": ["hi"]}}')
    declared = any_scorer.config.max_body_bytes + 1
    with pytest.raises(PayloadTooLarge, match=f"is {declared} bytes"):
        any_scorer.read_json(body, declared_length=declared)
    assert body.tell() == 0


def test_a_body_is_never_read_past_the_cap_whatever_it_declares(any_scorer: Scorer):
    body = io.BytesIO(b" " * (any_scorer.config.max_body_bytes * 3))
    with pytest.raises(PayloadTooLarge):
        any_scorer.read_json(body, declared_length=10)
    assert body.tell() == any_scorer.config.max_body_bytes + 1


def test_stream_is_served_only_where_the_door_can_stream(any_scorer: Scorer):
    with pytest.raises(InvalidRequest, match="/score endpoint only") as caught:
        score_api.score(any_scorer, text("hi", stream=True, max_new_tokens=2))
    assert caught.value.param == "parameters.stream"
    events = score_api.score(any_scorer, text("hi", stream=True, max_new_tokens=2), stream_ok=True)
    assert "".join(events).endswith("data: [DONE]\n\n")


def test_max_new_tokens_above_the_server_cap(any_scorer: Scorer):
    with pytest.raises(InvalidRequest, match="at most 64"):
        score_api.score(any_scorer, text("hi", max_new_tokens=65))


def test_default_max_new_tokens_comes_from_the_server(any_scorer: Scorer):
    assert score_api.score(any_scorer, text("hi", ignore_eos=True))[0]["usage"]["completion_tokens"] == 16


def test_a_request_id_that_would_forge_log_fields_is_quoted_in_the_log_line(scorer: Scorer, caplog):
    """The id may be the caller's x-request-id: bare, `x finish_reason=forged` read as a field of the line."""
    forged = "x finish_reason=forged\nrequest=other"
    with caplog.at_level(logging.INFO, logger="mixtral_endpoint.serving.service"):
        score_api.score(scorer, text("hi", max_new_tokens=2), request_id=forged)
        score_api.score(scorer, text("hi", max_new_tokens=2), request_id="plain-id.42")
    lines = [r.getMessage() for r in caplog.records if "completion_tokens=" in r.getMessage()]
    fields = [field.split("=", 1) for field in shlex.split(lines[0])]  # as a logfmt reader takes the line
    assert "\n" not in lines[0] and len({k for k, _ in fields}) == len(fields)
    assert dict(fields)["request"] == "x finish_reason=forged\\nrequest=other"
    assert dict(fields)["finish_reason"] == "length"
    assert lines[1].startswith("request=plain-id.42 engine=")
    assert caplog.records[-1].request_id == "plain-id.42"  # the record's own attribute keeps the id as it came


class HoldingEngine:
    """An engine whose one batch place is taken by a row that never ends: what a batch of long generations
    looks like to a request that has to wait for a place."""

    name = "holding"
    grammar_form = "compiled"
    context_window = 512

    def __init__(self) -> None:
        self.capacity = Capacity(rows=1)
        self.on_death: list = []

    def submit(self, rows: list[Row]) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_request_that_never_gets_a_place_ends_time_limit_at_its_deadline(tokenizer):
    """Not 30 s later as a stalled engine: its row waited in the line, never in the engine."""
    config = ServerConfig.from_env({"MIXTRAL_REQUEST_TIMEOUT_S": "0.5", "MIXTRAL_MAX_TOTAL_TOKENS": "512"})
    core = Scorer(HoldingEngine(), tokenizer, config)
    core.line.take([Row([1, 2], SamplingSettings(max_new_tokens=4))])  # the place, for ever
    start = time.monotonic()
    body = score_api.score(core, text("hi", max_new_tokens=4))
    assert body[0]["finish_reason"] == "time_limit" and body[0]["0"] == ""
    assert 0.5 <= time.monotonic() - start < 5 and core.line.counts[:2] == (1, 0)
