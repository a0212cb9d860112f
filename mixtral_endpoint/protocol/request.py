"""Request parsing, validation and response rendering. Pure: no torch, azureml or mlflow.

Validation happens in two steps: the JSON schema in `schemas/request.schema.json` (types,
bounds, unknown keys), then the conversation rules a schema cannot say (role order).
Every failure is an `InvalidRequest` whose `param` is the JSON path of the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from mixtral_endpoint.protocol.constraints import from_response_format
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.parameters import PARAMETERS, Parameter, default
from mixtral_endpoint.protocol.sampling import SamplingSettings

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
_PYTHON_TYPES = {"integer": int, "number": float}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class RequestLimits:
    max_new_tokens: int  # the cap; a request asking for more is refused
    default_max_new_tokens: int
    max_prompts: int  # text prompts in one request


@dataclass(frozen=True)
class ScoringRequest:
    """A validated request. Exactly one of `conversation` and `prompts` is set."""

    conversation: tuple[Message, ...] | None
    prompts: tuple[str, ...] | None
    settings: SamplingSettings
    return_full_text: bool
    return_token_ids: bool
    stream: bool = False
    stop: tuple[str, ...] = ()  # text, so checked in the core: the engine knows only token ids
    safe_prompt: bool | None = None  # None: the server's MIXTRAL_SAFE_PROMPT

    @property
    def is_chat(self) -> bool:
        return self.conversation is not None


@dataclass(frozen=True)
class Completion:
    """One scored prompt, ready to render."""

    text: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: str


@cache
def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name))


def parse_json(body: bytes | str) -> Any:
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {_short_json_error(exc)}") from None
    except RecursionError:
        raise InvalidRequest("the request body is not valid JSON: nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and a NaN temperature passes every bound.
    raise ValueError(f"{name} is not a JSON value")


def parse_request(payload: Any, limits: RequestLimits) -> ScoringRequest:
    errors = list(_validator("request").iter_errors(payload))
    if errors:
        any_of = [e for e in errors if e.validator == "anyOf"]
        raise _invalid(_deepest(any_of[0]) if any_of else best_match(errors))
    input_data = payload["input_data"]
    params = _merged_parameters(payload)
    items = input_data["input_string"]
    _check_unicode(items, "input_data.input_string")
    _check_unicode(params.get("stop", []), "parameters.stop")
    if isinstance(items[0], dict):
        conversation = tuple(Message(m["role"], m["content"]) for m in items)
        _check_conversation(conversation)
        prompts = None
    else:
        conversation = None
        prompts = tuple(items)
        if len(prompts) > limits.max_prompts:
            raise InvalidRequest(
                f"{len(prompts)} prompts in one request; at most {limits.max_prompts} are allowed",
                param="input_data.input_string",
            )
    stream = params.get("stream", default("stream"))
    if stream and prompts is not None and len(prompts) > 1:
        raise InvalidRequest(f"stream takes one prompt; this request has {len(prompts)}", param="parameters.stream")
    stop = params.get("stop", default("stop"))
    return ScoringRequest(
        conversation=conversation,
        prompts=prompts,
        settings=to_settings(params, limits),
        return_full_text=params.get("return_full_text", default("return_full_text")),
        return_token_ids=params.get("return_token_ids", default("return_token_ids")),
        stream=stream,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        safe_prompt=params.get("safe_prompt"),
    )


def to_settings(params: dict[str, Any], limits: RequestLimits) -> SamplingSettings:
    """Converts validated request parameters into engine settings, once, by name.

    Parameters left out take SamplingSettings' defaults, which are the table's; max_new_tokens,
    whose default is the server's, is the one place its cap is checked. response_format becomes the
    settings' Constraint.
    """
    values: dict[str, Any] = {p.name: _typed(p, params[p.name]) for p in PARAMETERS
                              if p.goes_to == "settings" and p.shape is None and p.name in params}
    if params.get("response_format") is not None:
        values["constraint"] = from_response_format(params["response_format"], "parameters.response_format")
    max_new_tokens = values.setdefault("max_new_tokens", limits.default_max_new_tokens)
    if max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens is {max_new_tokens}; this server allows at most {limits.max_new_tokens}",
            param="parameters.max_new_tokens",
        )
    return SamplingSettings(**values)


def _typed(parameter: Parameter, value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; the engine gets real ints (and floats, not ints, for numbers).
    convert = _PYTHON_TYPES.get(parameter.type)
    return value if convert is None or value is None else convert(value)


def render(request: ScoringRequest, completions: list[Completion]) -> dict[str, Any] | list[dict[str, Any]]:
    if request.is_chat:
        (completion,) = completions
        body = _result(completion, "output", completion.text, request.return_token_ids)
        if request.return_full_text:
            assert request.conversation is not None
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.conversation]
            body["messages"].append({"role": "assistant", "content": completion.text})
        return body
    assert request.prompts is not None
    return [
        _result(c, "0", prompt + c.text if request.return_full_text else c.text, request.return_token_ids)
        for prompt, c in zip(request.prompts, completions, strict=True)
    ]


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
    return body


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


def _check_unicode(value: Any, path: str) -> None:
    """JSON's \\ud800-style escapes can carry lone surrogates, which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{path} holds a lone UTF-16 surrogate; it is not valid Unicode text",
                                 param=path) from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        _check_unicode(value.get("content"), f"{path}.content")


def _check_conversation(conversation: tuple[Message, ...]) -> None:
    path = "input_data.input_string"
    turns = conversation[1:] if conversation[0].role == "system" else conversation
    offset = len(conversation) - len(turns)
    if not turns:
        raise InvalidRequest("the conversation has only a system message; it must end with a user message",
                             param=path)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = "only first" if message.role == "system" else f"'{expected}' expected"
            raise InvalidRequest(
                f"message {i + offset} has role '{message.role}' ({where}); roles must alternate "
                "user/assistant after an optional leading system message",
                param=f"{path}[{i + offset}].role",
            )
    if turns[-1].role != "user":
        raise InvalidRequest("the conversation must end with a user message",
                             param=f"{path}[{len(conversation) - 1}].role")


def _invalid(error: ValidationError) -> InvalidRequest:
    path = _json_path(error.absolute_path)
    kind, instance, schema = error.validator, error.instance, error.schema
    if kind == "additionalProperties":
        allowed = schema.get("properties", {})
        name = sorted(k for k in instance if k not in allowed)[0]
        what = "parameter" if path.endswith("parameters") else "field"
        return InvalidRequest(f"unknown {what} '{_clip(name)}'; allowed: {', '.join(allowed)}",
                              param=_join(path, name))
    if kind == "required":
        name = next(k for k in error.validator_value if k not in instance)
        return InvalidRequest(f"'{name}' is required", param=_join(path, name))
    field = path or "body"
    messages = {
        "type": lambda: f"{field} must be {_types(error.validator_value)}, got {_json_type(instance)}",
        "enum": lambda: f"{field} must be one of {', '.join(map(str, error.validator_value))}",
        "minimum": lambda: f"{field} must be >= {error.validator_value}, got {instance}",
        "maximum": lambda: f"{field} must be <= {error.validator_value}, got {instance}",
        "exclusiveMinimum": lambda: f"{field} must be > {error.validator_value}, got {instance}",
        "minItems": lambda: f"{field} must not be empty",
        "maxItems": lambda: f"{field} has {len(instance)} items; at most {error.validator_value} are allowed",
        "minLength": lambda: f"{field} must not be empty",
        "maxLength": lambda: f"{field} is {len(instance)} characters; at most {error.validator_value} are allowed",
    }
    message = messages.get(kind, lambda: f"{field} is not valid ({kind})")()
    return InvalidRequest(message, param=path or None)


def _deepest(error: ValidationError) -> ValidationError:
    """Inside anyOf, report the branch that matches the data's shape, as deep as it goes."""
    if error.validator != "anyOf" or not error.context:
        return error
    branch = _branch_for(error.instance)
    chosen = [e for e in error.context if branch is None or e.schema_path[0] == branch]
    return _deepest(best_match(chosen)) if chosen else error


def _branch_for(instance: Any) -> int | None:
    # The two anyOf in the schema: input_string (0 conversation, 1 prompts), stop (0 string, 1 list).
    if isinstance(instance, list) and instance:
        return 0 if isinstance(instance[0], dict) else 1
    if isinstance(instance, list):
        return None
    return 0 if isinstance(instance, str) else None


def _json_path(parts: Any) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _join(path: str, name: str) -> str:
    # A key that is not a plain name is quoted, so that the path still reads as one: parameters["a b"].
    if re.fullmatch(r"\w+", name):
        return f"{path}.{_clip(name)}" if path else _clip(name)
    return f"{path}[{json.dumps(_clip(name), ensure_ascii=False)}]"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _types(expected: str | list[str]) -> str:
    names = [expected] if isinstance(expected, str) else expected
    return " or ".join(n if n == "null" else ("an " if n[0] in "aeiou" else "a ") + n for n in names)


def _json_type(value: Any) -> str:
    for name, kind in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                       ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _short_json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)
