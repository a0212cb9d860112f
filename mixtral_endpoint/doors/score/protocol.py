"""/score's API, the model card's: `{"input_data": {"input_string": [...], "parameters"?}, "parameters"?}` in,
as the core's request; the core's completions out, as `/score`'s bodies and server-sent events. Pure: no
torch, flask, azureml or mlflow.

The body is checked against `schemas/request.schema.json` (its shape: a conversation or text prompts), the
parameters against the table, then `build_request` applies the rules every door shares. Errors name the
field by its JSON path (`input_data.input_string[1].role`, `parameters.max_new_tokens`).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.request import (
    Completion,
    Fields,
    Logprob,
    Message,
    RequestLimits,
    ScoringRequest,
    build_request,
    check_parameters,
)
from mixtral_endpoint.protocol.validation import check, json_path, load_schema

INPUT = "input_data.input_string"


def parse_request(payload: Any, limits: RequestLimits) -> ScoringRequest:
    check(_shape(), payload, json_path)
    input_data = payload["input_data"]
    for where, parameters in ((["parameters"], payload.get("parameters", {})),
                              (["input_data", "parameters"], input_data.get("parameters", {}))):
        check_parameters(parameters, lambda name, where=where: json_path([*where, name]))
    parameters = _merged_parameters(payload)
    top = payload.get("parameters", {})
    fields = Fields(input=INPUT, message=lambda i: f"{INPUT}[{i}]", prompt=lambda i: f"{INPUT}[{i}]",
                    parameter=lambda name: json_path([*(["parameters"] if name in top or name not in parameters
                                                        else ["input_data", "parameters"]), name]))
    items = input_data["input_string"]
    if isinstance(items[0], dict):
        request = build_request(conversation=[Message(m["role"], m["content"]) for m in items],
                                parameters=parameters, limits=limits, fields=fields)
    else:
        request = build_request(prompts=items, parameters=parameters, limits=limits, fields=fields)
    # /score's events carry no answer's index (the OpenAI routes stream several answers).
    if request.stream and request.prompts is not None and len(request.prompts) > 1:
        raise InvalidRequest(f"stream takes one prompt; this request has {len(request.prompts)}",
                             param=fields.parameter("stream"))
    if request.stream and request.n > 1:
        raise InvalidRequest("stream takes one answer; this request asks for n > 1", param=fields.parameter("n"))
    return request


def render(request: ScoringRequest, completions: list[Completion]) -> dict[str, Any] | list[dict[str, Any]]:
    """A conversation: one object, its first answer's (with n > 1 every answer also under `choices`); text
    prompts: one row per answer, prompt by prompt, each prompt's n answers together."""
    if request.is_chat:
        completion = completions[0]
        body = _result(completion, "output", completion.text, request.return_token_ids)
        if request.return_full_text:
            assert request.conversation is not None
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.conversation]
            body["messages"].append({"role": "assistant", "content": completion.text})
        if request.n > 1:
            body["choices"] = [_result(c, "output", c.text, request.return_token_ids) for c in completions]
            new = sum(len(c.token_ids) for c in completions)
            body["usage"] = {**body["usage"], "completion_tokens": new,
                             "total_tokens": body["usage"]["prompt_tokens"] + new}
        return body
    return [_result(c, "0", c.prompt_text + c.text if request.return_full_text else c.text, request.return_token_ids)
            for c in completions]


def render_stream_delta(text: str) -> str:
    """One server-sent event carrying the next piece of text."""
    return f"data: {json.dumps({'delta': text}, ensure_ascii=False)}\n\n"


def render_stream_end(request: ScoringRequest, completion: Completion) -> str:
    """The last events of a stream: finish reason and usage (and ids when asked), then [DONE]."""
    body = _result(completion, "delta", "", request.return_token_ids)
    del body["delta"]
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


def render_stream_error(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


@cache
def _shape() -> Draft202012Validator:
    """The request schema with its parameters left to the table's own check (`check_parameters`)."""
    schema = copy.deepcopy(load_schema("request"))
    schema["$defs"]["parameters"] = {"type": "object"}
    return Draft202012Validator(schema)


def _result(completion: Completion, key: str, text: str, with_ids: bool) -> dict[str, Any]:
    prompt_tokens, completion_tokens = len(completion.prompt_token_ids), len(completion.token_ids)
    body: dict[str, Any] = {
        key: text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if with_ids:
        body["prompt_token_ids"] = list(completion.prompt_token_ids)
        body["token_ids"] = list(completion.token_ids)
    for name in ("logprobs", "prompt_logprobs"):
        entries = getattr(completion, name)
        if entries is not None:
            body[name] = [_logprob(entry) for entry in entries]
    return body


def _logprob(entry: Logprob, *, top: bool = True) -> dict[str, Any]:
    shaped = {"token_id": entry.token_id, "token": entry.text.decode("utf-8", errors="replace"),
              "logprob": entry.logprob}
    if top:
        shaped["top"] = [_logprob(alternative, top=False) for alternative in entry.top]
    return shaped


def _merged_parameters(payload: dict[str, Any]) -> dict[str, Any]:
    top = payload.get("parameters", {})
    inner = payload["input_data"].get("parameters", {})
    for name in sorted(top.keys() & inner.keys()):
        if top[name] != inner[name]:
            raise InvalidRequest(
                f"parameter '{name}' is given both at the top level and inside input_data, "
                "with different values",
                param=f"parameters.{name}",
            )
    return {**inner, **top}
