"""The OpenAI Responses API (`POST /v1/responses`): its body in as the core's request, the core's completion out
as a response object or as its numbered server-sent events. Pure: no torch, flask, azureml or mlflow.

Input items become the chat door's messages and go through its conversion (`openai.conversation`), so a
conversation is the same mistral-common conversation, token for token, as on /v1/chat/completions:
`instructions` is the system message, `function_call` items an assistant's tool_calls, `function_call_output`
items `tool` messages. Tools are chat's (flat here), `text.format` is chat's response_format, both through
protocol/tools.py and protocol/constraints.py; errors name the Responses field the caller sent.

Nothing is stored: several instances behind a load balancer share no memory, and no shared store is
configured, so `previous_response_id` (and `conversation`, `background`, `item_reference`) are refused by
name and `store: true` is taken but keeps nothing (the response says `store: false`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Final

from mixtral_endpoint.doors.openai import protocol as openai
from mixtral_endpoint.protocol.config import MODEL_NAME
from mixtral_endpoint.protocol.errors import InvalidRequest, NotFound, ScoringError
from mixtral_endpoint.protocol.parameters import PARAMETERS
from mixtral_endpoint.protocol.request import Completion, Fields, RequestLimits, ScoringRequest, build_request
from mixtral_endpoint.protocol.tools import ToolUse, parse_tool_use, read_calls
from mixtral_endpoint.protocol.validation import check_unicode, clip, json_type

STATELESS: Final = ("this server stores no responses: several instances behind the endpoint's load balancer "
                    "share no memory, and no shared store is configured")
# The Responses fields taken; those for OpenAI's own bookkeeping are checked for type and change nothing.
_TAKEN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
          "parallel_tool_calls", "stream", "stream_options", "text", "store", "metadata", "user", "include"}
_STRINGS = ("model", "user", "service_tier", "prompt_cache_key", "safety_identifier", "prompt_cache_retention")
# Responses fields that need state, or what Mixtral-8x7B does not do: a 400 naming them when set.
_REFUSED: Final[dict[str, str]] = {
    "previous_response_id": STATELESS + "; send the whole conversation as input",
    "conversation": STATELESS + "; send the whole conversation as input",
    "background": STATELESS + "; send the request without background",
    "prompt": "stored prompt templates are not supported; send instructions and input",
    "reasoning": "Mixtral-8x7B does not reason before it answers",
    "top_logprobs": "log-probabilities are answered on /v1/chat/completions, not here",
    "max_tool_calls": "it bounds OpenAI's built-in tools, which this server does not run",
    "truncation": "only 'disabled': a conversation over the context window is refused, not truncated",
}
_UNSET: Final[dict[str, tuple[Any, ...]]] = {"background": (False,), "reasoning": ({},), "top_logprobs": (0,),
                                             "truncation": ("disabled",)}
# Our parameters the caller may add (as on the chat route), by their OpenAI names; `seed` too, which the
# Responses API lacks.
_OURS = {p.openai: p.name for p in PARAMETERS if p.openai is not None}
EXTRAS: Final = tuple(sorted({*openai.EXTRAS, "seed"} - {"prompt_logprobs"}))
_FIELDS = frozenset(_TAKEN | set(_STRINGS) | set(_REFUSED))
_NAMES = {**{ours: theirs for theirs, ours in _OURS.items()}, "max_new_tokens": "max_output_tokens",
          "do_sample": "temperature", "response_format": "text.format"}
# Chat's shapes as the Responses API names them, for errors the chat door's helpers raise.
_RENAMES = ((re.compile(r"\b(tools\[\d+\])\.function(?=\.)"), r"\1"),
            (re.compile(r"\btool_choice\.function(?=\.)"), "tool_choice"),
            (re.compile(r"\btext\.format\.json_schema(?=\.)"), "text.format"))
_ITEM_KEYS: Final[dict[str, frozenset[str]]] = {
    "message": frozenset({"type", "role", "content", "id", "status", "phase"}),
    "function_call": frozenset({"type", "id", "call_id", "name", "arguments", "status"}),
    "function_call_output": frozenset({"type", "id", "call_id", "output", "status"}),
}
_ROLES = ("user", "assistant", "system", "developer")
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_FORMATS = ("text", "json_object", "json_schema")
_FORMAT_KEYS = frozenset({"type", "name", "description", "schema", "strict"})
_REASONS = {"length": "max_output_tokens", "time_limit": "max_output_tokens", "content_filter": "content_filter"}


@dataclass(frozen=True)
class ResponsesRequest:
    request: ScoringRequest
    tools: ToolUse | None  # the answer may (auto) or must be function calls
    echo: dict[str, Any]  # the request's settings, as the response object repeats them


def parse(body: Any, limits: RequestLimits, *, extra_parameters: str | None = None) -> ResponsesRequest:
    """Validates a Responses body through the core's own rules; errors name the Responses field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    mode = openai.extra_mode(extra_parameters)
    _check_bookkeeping(body)
    paths: list[str] = []  # the Responses field each chat message came from
    try:
        tool_use = parse_tool_use(_chat_tools(body))
        parameters = _parameters(body, mode)
        if tool_use is not None and parameters.get("response_format", {"type": "text"}) != {"type": "text"}:
            raise InvalidRequest("text.format and tools both constrain the answer; send one, or tool_choice none",
                                 param="text.format")
        messages, paths = _messages(body)
        conversation, origin = openai.conversation({"messages": messages}, tool_use)
        fields = Fields(input="input", message=lambda k: paths[origin[k]], prompt=lambda i: "input",
                        parameter=lambda name: _NAMES.get(name, name))
        request = build_request(conversation=conversation, parameters=parameters, limits=limits, fields=fields)
    except InvalidRequest as exc:
        raise _in_responses_names(exc, paths) from None
    if tool_use is not None:
        request = replace(request, settings=replace(request.settings, constraint=tool_use.constraint()))
    return ResponsesRequest(request, tool_use, _echo(body))


def _check_bookkeeping(body: dict[str, Any]) -> None:
    """Fields that change no answer still have a type; those that need state or what Mixtral lacks are refused."""
    for name in _STRINGS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidRequest(f"{name} must be a string, got {json_type(body[name])}", param=name)
    for name in ("store", "parallel_tool_calls", "stream"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise InvalidRequest(f"{name} must be a boolean, got {json_type(body[name])}", param=name)
    for name, why in _REFUSED.items():
        value = body.get(name)
        if value is not None and value not in _UNSET.get(name, ()):
            raise InvalidRequest(f"{name} is not supported: {why}", param=name)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise InvalidRequest("metadata must be an object of at most 16 string values", param="metadata")
        for key, value in metadata.items():
            if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
                raise InvalidRequest("metadata's keys are at most 64 characters and its values strings of at most "
                                     "512", param=f"metadata.{clip(key)}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) for i in include)):
        raise InvalidRequest("include must be a list of strings", param="include")
    if include and "message.output_text.logprobs" in include:
        raise InvalidRequest("include message.output_text.logprobs is not supported: log-probabilities are "
                             "answered on /v1/chat/completions", param="include")


def _parameters(body: dict[str, Any], mode: str) -> dict[str, Any]:
    """The body's sampling fields as the parameters table names them."""
    parameters = openai.extra_parameters(body, _FIELDS, EXTRAS, mode)
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            parameters[name] = body[name]
    # As OpenAI: sampled unless temperature is 0; its default temperature is 1.
    temperature = body.get("temperature")
    parameters["do_sample"] = temperature != 0 or isinstance(temperature, bool)
    if body.get("max_output_tokens") is not None:
        parameters["max_new_tokens"] = body["max_output_tokens"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        parameters["response_format"] = response_format
    return parameters


def _response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's response_format, whose checks the core makes."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidRequest(f"text must be an object with format, got {json_type(text)}", param="text")
    for key in text:
        if key not in ("format", "verbosity"):
            raise InvalidRequest(f"unknown field '{clip(key)}' in text; allowed: format", param=f"text.{clip(key)}")
    if text.get("verbosity") not in (None, "medium"):
        raise InvalidRequest("text.verbosity is not supported: Mixtral-8x7B answers as it answers",
                             param="text.verbosity")
    form = text.get("format")
    if form is None:
        return None
    if not isinstance(form, dict) or form.get("type") not in _FORMATS:
        raise InvalidRequest(f"text.format must be {{\"type\": ...}} with type one of {', '.join(_FORMATS)}",
                             param="text.format.type" if isinstance(form, dict) else "text.format")
    allowed = _FORMAT_KEYS if form["type"] == "json_schema" else {"type"}
    for key in form:
        if key not in allowed:
            raise InvalidRequest(f"unknown field '{clip(key)}' in text.format of type {form['type']}",
                                 param=f"text.format.{clip(key)}")
    if form["type"] != "json_schema":
        return {"type": form["type"]}
    return {"type": "json_schema", "json_schema": {k: v for k, v in form.items() if k != "type"}}


def _chat_tools(body: dict[str, Any]) -> dict[str, Any]:
    """The body's tools and tool_choice as the chat door's (`{"type": "function", "function": {...}}`); OpenAI's
    built-in tools are refused by name."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of {\"type\": \"function\", \"name\", \"parameters\"}",
                             param="tools")
    chat = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools[{i}] must be an object", param=f"tools[{i}]")
        kind = tool.get("type")
        if kind != "function":
            what = f"is the built-in tool '{clip(kind)}'" if isinstance(kind, str) else "has no type 'function'"
            raise InvalidRequest(f"tools[{i}] {what}; this server runs no built-in tools, only function tools "
                                 "(type function)", param=f"tools[{i}].type")
        for key in tool:
            if key not in _TOOL_KEYS:
                raise InvalidRequest(f"unknown field '{clip(key)}' in tools[{i}]", param=f"tools[{i}].{clip(key)}")
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise InvalidRequest(f"tools[{i}].strict must be a boolean", param=f"tools[{i}].strict")
        chat.append({"type": "function", "function": {k: v for k, v in tool.items() if k not in ("type", "strict")}})
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind != "function":
            raise InvalidRequest(f"tool_choice of type '{clip(str(kind))}' is not supported: only none, auto, "
                                 "required or {\"type\": \"function\", \"name\": ...}", param="tool_choice.type")
        if not isinstance(choice.get("name"), str):
            raise InvalidRequest("tool_choice.name must be the name of one of the tools", param="tool_choice.name")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None and choice not in ("none", "auto", "required"):
        raise InvalidRequest("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                             param="tool_choice")
    return {"tools": chat if tools is not None else None, "tool_choice": choice,
            "parallel_tool_calls": body.get("parallel_tool_calls")}


def _messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """`instructions` and `input` as the chat door's messages, and the Responses field each came from."""
    messages: list[dict[str, Any]] = []
    paths: list[str] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest(f"instructions must be a string, got {json_type(instructions)}",
                                 param="instructions")
        check_unicode(instructions, "instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
            paths.append("instructions")
    items = body.get("input")
    if isinstance(items, str):
        if not items:
            raise InvalidRequest("input must not be empty", param="input")
        check_unicode(items, "input")
        messages.append({"role": "user", "content": items})
        paths.append("input")
        return messages, paths
    if not isinstance(items, list):
        raise InvalidRequest("input is required: a string, or a list of items", param="input")
    for k, item in enumerate(items):
        path = f"input[{k}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{path} must be an object: a message, a function_call or a function_call_output",
                                 param=path)
        kind = item.get("type", "message")
        if kind not in _ITEM_KEYS:
            why = STATELESS if kind == "item_reference" else "only message, function_call and function_call_output"
            raise InvalidRequest(f"{path} has type '{clip(str(kind))}', which is not supported: {why}",
                                 param=f"{path}.type")
        for key in item:
            if key not in _ITEM_KEYS[kind]:
                raise InvalidRequest(f"unknown field '{clip(key)}' in {path}, a {kind}", param=f"{path}.{clip(key)}")
        if kind == "message":
            message = _message(item, path)
            if message["role"] == "system" and paths == ["instructions"]:
                messages[0]["content"] += "\n\n" + message["content"]  # one system message: instructions first
                continue
            messages.append(message)
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", path), "type": "function",
                    "function": {"name": _string(item, "name", path), "arguments": _arguments(item, path)}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)  # calls after text: one assistant turn
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            before = messages[-1] if messages else {}
            if before.get("role") != "tool" and not before.get("tool_calls"):
                raise InvalidRequest(f"{path} is a function_call_output that follows no function_call",
                                     param=f"{path}.type")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", path),
                             "content": _text(item.get("output"), f"{path}.output", ("input_text",))})
        paths.append(path)
    return messages, paths


def _message(item: dict[str, Any], path: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequest(f"{path}.role must be one of {', '.join(_ROLES)}, got {clip(str(role))!r}",
                             param=f"{path}.role")
    parts = ("output_text", "input_text") if role == "assistant" else ("input_text",)
    return {"role": "system" if role == "developer" else role,
            "content": _text(item.get("content"), f"{path}.content", parts)}


def _text(content: Any, path: str, parts: tuple[str, ...]) -> str:
    """A string, or text parts joined; Mixtral-8x7B reads text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{path} must be a string or a list of {parts[0]} parts, got {json_type(content)}",
                             param=path)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in parts or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{path}[{j}] must be a text part {{\"type\": \"{parts[0]}\", \"text\": ...}}; "
                                 "Mixtral-8x7B reads text only", param=f"{path}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict[str, Any], key: str, path: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{path}.{key} must be a non-empty string, got {json_type(value)}",
                             param=f"{path}.{key}")
    return value


def _arguments(item: dict[str, Any], path: str) -> str:
    arguments = item.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{path}.arguments must be a JSON object, as a string", param=f"{path}.arguments")
    return arguments


def _in_responses_names(error: InvalidRequest, paths: list[str]) -> InvalidRequest:
    """An error the chat door's helpers raised, naming the Responses field instead of chat's."""

    def rename(text: str) -> str:
        for pattern, name in _RENAMES:
            text = pattern.sub(name, text)
        return re.sub(r"\bmessages\[(\d+)\]", lambda m: paths[int(m.group(1))] if int(m.group(1)) < len(paths)
                      else "input", text)

    return type(error)(rename(error.message), param=None if error.param is None else rename(error.param))


def _echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request's settings as OpenAI's response object repeats them (its defaults where unset)."""
    form = (body.get("text") or {}).get("format") or {"type": "text"}
    choice = body.get("tool_choice") or "auto"
    return {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "text": {"format": form},
            "tool_choice": choice, "tools": [{"strict": None, "description": None, "parameters": None, **t}
                                             for t in body.get("tools") or []], "user": body.get("user")}


def output(parsed: ResponsesRequest, completion: Completion, request_id: str) -> list[dict[str, Any]]:
    """The output items: function calls when the answer is calls, else one assistant message."""
    calls = read_calls(completion.text, parsed.tools) if parsed.tools is not None else None
    if calls is not None:
        return [{"type": "function_call", "id": f"fc_{request_id}_{j}", "call_id": call["id"],
                 "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}
                for j, call in enumerate(calls)]
    status = "incomplete" if completion.finish_reason in _REASONS else "completed"
    return [_message_item(request_id, status, [_part(completion.text)])]


def render(parsed: ResponsesRequest, completion: Completion, request_id: str, created_at: int) -> dict[str, Any]:
    items = output(parsed, completion, request_id)
    calls = items[0]["type"] == "function_call"
    reason = None if calls else _REASONS.get(completion.finish_reason)
    return _response(parsed, request_id, created_at, items, status="incomplete" if reason else "completed",
                     incomplete=None if reason is None else {"reason": reason}, usage=usage(completion))


def usage(completion: Completion) -> dict[str, Any]:
    prompt, new = len(completion.prompt_token_ids), len(completion.token_ids)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": new,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + new}


def _response(parsed: ResponsesRequest, request_id: str, created_at: int, items: list[dict[str, Any]], *,
              status: str, incomplete: dict[str, str] | None = None, usage: dict[str, Any] | None = None,
              error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"resp_{request_id}", "object": "response", "created_at": created_at, "status": status,
            "background": False, "error": error, "incomplete_details": incomplete, "model": MODEL_NAME,
            "output": items, "previous_response_id": None, "reasoning": None, "store": False,
            "truncation": "disabled", "usage": usage, **parsed.echo}


def _message_item(request_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{request_id}", "role": "assistant", "status": status, "content": content}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class Events:
    """One response as server-sent events, numbered from 0: created and in_progress, the message's text as it
    comes, then each output item closed (function calls whole, their arguments as one delta), and
    response.completed (or response.incomplete after a length cut, as OpenAI)."""

    def __init__(self, parsed: ResponsesRequest, request_id: str, created_at: int) -> None:
        self._parsed = parsed
        self._request_id = request_id
        self._created_at = created_at
        self._sequence = 0
        self._opened = False  # the message item and its text part were announced

    def start(self) -> str:
        response = _response(self._parsed, self._request_id, self._created_at, [], status="in_progress")
        return self._event("response.created", response=response) + self._event("response.in_progress",
                                                                                 response=response)

    def text(self, piece: str) -> str:
        return self._open() + self._event("response.output_text.delta", **self._where(), delta=piece, logprobs=[])

    def end(self, completion: Completion, *, held: bool) -> str:
        """The last events; `held`: the text was held back (it may have been calls), and goes out now."""
        response = render(self._parsed, completion, self._request_id, self._created_at)
        events = ""
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                part = item["content"][0]
                events += self._open()
                if held and part["text"]:
                    events += self._event("response.output_text.delta", **self._where(), delta=part["text"],
                                          logprobs=[])
                events += (self._event("response.output_text.done", **self._where(), text=part["text"], logprobs=[])
                           + self._event("response.content_part.done", **self._where(), part=part))
            else:
                where = {"item_id": item["id"], "output_index": index}
                events += (self._event("response.output_item.added", output_index=index,
                                       item={**item, "arguments": "", "status": "in_progress"})
                           + self._event("response.function_call_arguments.delta", **where, delta=item["arguments"])
                           + self._event("response.function_call_arguments.done", **where, name=item["name"],
                                         arguments=item["arguments"]))
            events += self._event("response.output_item.done", output_index=index, item=item)
        done = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return events + self._event(done, response=response)

    def error(self, error: ScoringError) -> str:
        """A failure midway: OpenAI's error event, then the response failed."""
        body = openai.error_body(error)["error"]
        failed = _response(self._parsed, self._request_id, self._created_at, [], status="failed",
                           error={"code": error.code, "message": error.message})
        return (self._event("error", code=body["code"], message=body["message"], param=body["param"])
                + self._event("response.failed", response=failed))

    def _open(self) -> str:
        if self._opened:
            return ""
        self._opened = True
        item = _message_item(self._request_id, "in_progress", [])
        return (self._event("response.output_item.added", output_index=0, item=item)
                + self._event("response.content_part.added", **self._where(), part=_part("")))

    def _where(self) -> dict[str, Any]:
        return {"item_id": f"msg_{self._request_id}", "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


def not_stored(response_id: str) -> NotFound:
    """What `GET /v1/responses/{id}` and its siblings answer."""
    return NotFound(f"response {clip(response_id)!r} is not stored: {STATELESS}", param="response_id")

