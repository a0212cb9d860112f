"""The OpenAI and Azure AI Model Inference protocol: their bodies in as the core's request, the core's
completions out as their objects. Pure: no torch, flask, azureml or mlflow.

A body's messages or prompts and its parameters (by the table's OpenAI names) become the core's request
through `build_request`, the rules every door shares; errors name the OpenAI field the caller sent
(`max_tokens`, `messages[1].role`), as this door's `Fields` say.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from mixtral_endpoint.protocol.config import MODEL_NAME
from mixtral_endpoint.protocol.errors import InvalidRequest, ScoringError
from mixtral_endpoint.protocol.parameters import PARAMETERS
from mixtral_endpoint.protocol.request import (
    Completion,
    Fields,
    Logprob,
    Message,
    Piece,
    RequestLimits,
    ScoringRequest,
    build_request,
)
from mixtral_endpoint.protocol.tools import RESULTS_HEADER, ToolUse, calls_text, parse_tool_use, read_calls, result_line
from mixtral_endpoint.protocol.validation import clip, json_type

MODEL_INFO = {"model_name": MODEL_NAME, "model_type": "chat-completion", "model_provider_name": "Mistral AI"}
Route = Literal["chat", "completions"]

# The OpenAI fields each route understands. Ours that OpenAI lacks (top_k, repetition_penalty,
# ignore_eos) are "extra parameters": taken unless the `extra-parameters` header says error or drop.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "user",
           "logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "response_format"}
# OpenAI chat fields that change nothing here (bookkeeping for OpenAI's own service).
_IGNORED = {"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
_TOOLS = {"tools", "tool_choice", "parallel_tool_calls"}  # protocol/tools.py
# OpenAI chat fields for what Mixtral-8x7B cannot do: a 400 naming them when set.
_UNSUPPORTED = ("functions", "function_call", "modalities", "audio", "prediction", "reasoning_effort",
                "web_search_options", "verbosity")
OPENAI_FIELDS: dict[Route, frozenset[str]] = {
    "chat": frozenset(_COMMON | _IGNORED | _TOOLS | {"messages", "max_completion_tokens", "top_logprobs",
                                                     *_UNSUPPORTED}),
    "completions": frozenset(_COMMON | {"prompt", "echo", "best_of", "suffix"}),
}
# Our parameters as the OpenAI names them; those not among OPENAI_FIELDS are extras.
_OURS = {p.openai: p.name for p in PARAMETERS if p.openai is not None}
_THEIRS = {ours: theirs for theirs, ours in _OURS.items()}
EXTRAS = tuple(sorted(name for name in _OURS if name not in OPENAI_FIELDS["chat"]))
EXTRA_MODES = ("error", "drop", "pass-through")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_STATUS_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


@dataclass(frozen=True)
class OpenAIRequest:
    route: Route
    request: ScoringRequest
    include_usage: bool  # stream_options.include_usage: a last chunk carrying usage
    tools: ToolUse | None = None  # the answer may (auto) or must be tool calls
    echo: bool = False  # completions: the prompt, then the answer (and their log-probabilities)
    prompt_only: bool = False  # echo with max_tokens 0: the prompt scored, nothing generated


def parse(body: Any, route: Route, limits: RequestLimits, *, extra_parameters: str | None) -> OpenAIRequest:
    """Validates an OpenAI body through the core's own rules; errors name the OpenAI field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    mode = extra_mode(extra_parameters)
    _refuse_what_mixtral_cannot_do(body)
    parameters = _parameters(body, route, mode)
    echo, prompt_only = _logprobs(body, route, parameters)
    tool_use = parse_tool_use(body) if route == "chat" else None
    if tool_use is not None and body.get("response_format") not in (None, {"type": "text"}):
        raise InvalidRequest("response_format and tools both constrain the answer; send one, or tool_choice none",
                             param="response_format")
    name = functools.partial(_openai_name, body=body)
    if route == "chat":
        messages, origin = conversation(body, tool_use)
        fields = Fields(input="messages", message=lambda k: f"messages[{origin[k]}]", prompt=lambda i: "messages",
                        parameter=name)
        request = build_request(conversation=messages, parameters=parameters, limits=limits, fields=fields)
    else:
        prompts, single = _prompts(body)
        fields = Fields(input="prompt", message=lambda k: "prompt", prompt=lambda i: "prompt" if single else
                        f"prompt[{i}]", parameter=name)
        request = build_request(prompts=prompts, parameters=parameters, limits=limits, fields=fields)
    if tool_use is not None:
        request = replace(request, settings=replace(request.settings, constraint=tool_use.constraint()))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    return OpenAIRequest(route, request, include_usage=bool(options.get("include_usage")), tools=tool_use,
                         echo=echo, prompt_only=prompt_only)


def _refuse_what_mixtral_cannot_do(body: dict[str, Any]) -> None:
    # Mixtral-8x7B reads and writes text (tools through `tools`).
    for name in (*_UNSUPPORTED, "suffix"):
        if body.get(name) not in (None, [], {}, ["text"]):
            raise InvalidRequest(f"{name} is not supported: Mixtral-8x7B reads and writes plain text (for functions, "
                                 "send tools)", param=name)
    best_of = body.get("best_of")
    if best_of not in (None, 1) or isinstance(best_of, bool):  # as vLLM's V1 engine: n answers, not a best of them
        raise InvalidRequest("best_of is not supported: only 1 (send n for several answers)", param="best_of")


def _logprobs(body: dict[str, Any], route: Route, parameters: dict[str, Any]) -> tuple[bool, bool]:
    """OpenAI's log-probability fields as the table's `logprobs` and `prompt_logprobs`; returns (echo, whether
    only the prompt is scored). Chat: `logprobs: true` and `top_logprobs: k`; completions: `logprobs: k`, and
    `echo`, which returns the prompt and its log-probabilities before the answer (with `max_tokens: 0`, the
    prompt alone, as lm-evaluation-harness scores a continuation)."""
    logprobs = body.get("logprobs")
    if route == "chat":
        top = body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise InvalidRequest(f"logprobs must be a boolean, got {json_type(logprobs)}", param="logprobs")
        if top is not None and logprobs is not True:
            raise InvalidRequest("logprobs must be true when top_logprobs is set", param="logprobs")
        if logprobs:
            parameters["logprobs"] = 0 if top is None else top
        return False, False
    if logprobs is not None:
        parameters["logprobs"] = logprobs
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise InvalidRequest(f"echo must be a boolean, got {json_type(echo)}", param="echo")
    if echo and logprobs is not None:
        parameters["prompt_logprobs"] = logprobs
    prompt_only = bool(echo) and parameters.get("max_new_tokens") == 0 and not isinstance(body.get("max_tokens"), bool)
    if prompt_only:
        parameters["max_new_tokens"] = 1  # one step scores the prompt; its token is not answered
    return bool(echo), prompt_only


def extra_mode(header: str | None) -> str:
    """Azure AI Model Inference's `extra-parameters` header. Without it, as vLLM's server and Azure's catalog
    container do: our extras pass through."""
    mode = (header or "pass-through").strip().lower()
    if mode not in EXTRA_MODES:
        raise InvalidRequest(f"the extra-parameters header must be one of {', '.join(EXTRA_MODES)}, got "
                             f"{clip(header or '')!r}", param="extra-parameters")
    return mode


def extra_parameters(body: dict[str, Any], known: frozenset[str], allowed: Sequence[str], mode: str) -> dict[str, Any]:
    """The body's fields beyond a route's `known` ones, as the parameters table names them: a 400 under `error`,
    none under `drop`, and under `pass-through` those among `allowed` (a 400 naming any other)."""
    extras = [k for k in body if k not in known]
    if extras and mode == "error":
        raise InvalidRequest(f"unknown parameter '{clip(extras[0])}'; extra parameters ({', '.join(allowed)}) need "
                             "the header extra-parameters: pass-through", param=clip(extras[0]))
    if mode != "pass-through":
        return {}
    unknown = [k for k in extras if k not in allowed]
    if unknown:
        raise InvalidRequest(f"unknown parameter '{clip(unknown[0])}'; this model takes the extra parameters "
                             f"{', '.join(allowed)}", param=clip(unknown[0]))
    return {_OURS[k]: body[k] for k in extras}


def _parameters(body: dict[str, Any], route: Route, mode: str) -> dict[str, Any]:
    parameters = extra_parameters(body, OPENAI_FIELDS[route], EXTRAS, mode)
    for name in ("temperature", "top_p", "stop", "seed", "stream", "response_format", "n", "presence_penalty",
                 "frequency_penalty", "logit_bias"):
        if body.get(name) is not None:
            parameters[_OURS[name]] = body[name]
    # OpenAI samples unless temperature is 0; its default temperature is 1.
    temperature = body.get("temperature")
    parameters["do_sample"] = temperature != 0 or isinstance(temperature, bool)
    limit = [body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if len(limit) == 2 and limit[0] != limit[1]:
        raise InvalidRequest("max_tokens and max_completion_tokens differ; send one of them",
                             param="max_completion_tokens")
    if limit:
        parameters["max_new_tokens"] = limit[0]
    return parameters


def conversation(body: dict[str, Any], tool_use: ToolUse | None) -> tuple[list[Message], list[int]]:
    """The conversation of a body's `messages`, and the index in them each of its messages came from (the
    Responses door converts its input items into such messages and shares this).

    With tools, their instructions join the system message; an assistant's tool_calls become the array it
    answered with, and `tool` messages (with any user text after them) one user turn (protocol/tools.py)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages is required: a list of {role, content} messages", param="messages")
    converted: list[dict[str, Any]] = []
    origin: list[int] = []
    called: dict[str, str] = {}  # tool call id -> function name, from earlier assistant turns
    results = False  # the last converted message is a results turn, which tool and user messages extend
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in (*_ROLES, "tool"):  # a list or an object cannot be looked up
            raise InvalidRequest(f"messages[{i}].role must be one of system, developer, user, assistant, tool, got "
                                 f"{clip(str(role))!r}", param=f"messages[{i}].role")
        content = _text(message.get("content"), f"messages[{i}].content")
        if role == "tool":
            previous = messages[i - 1] if i else {}  # a dict: checked on the turn before
            before = previous.get("role")
            if before != "tool" and not (before == "assistant" and previous.get("tool_calls")):
                raise InvalidRequest(f"messages[{i}] has role 'tool' but does not answer an assistant message's "
                                     "tool_calls", param=f"messages[{i}].role")
            if not isinstance(content, str):
                raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
            call_id = message.get("tool_call_id")
            line = result_line(call_id, called.get(call_id) if isinstance(call_id, str) else None, content)
            if results:
                converted[-1]["content"] += "\n" + line
            else:
                converted.append({"role": "user", "content": f"{RESULTS_HEADER}\n{line}"})
                origin.append(i)
            results = True
            continue
        if message.get("tool_calls") and role == "assistant":
            calls, names = calls_text(message["tool_calls"], f"messages[{i}].tool_calls")
            called.update(names)
            content = f"{content}\n{calls}" if isinstance(content, str) and content else calls
        if results and role == "user" and isinstance(content, str) and content:
            converted[-1]["content"] += "\n\n" + content
        else:
            converted.append({"role": _ROLES[role], "content": content})
            origin.append(i)
        results = False
    if tool_use is not None:
        if converted and converted[0]["role"] == "system" and isinstance(converted[0]["content"], str):
            converted[0]["content"] += "\n\n" + tool_use.instructions()
        else:
            converted.insert(0, {"role": "system", "content": tool_use.instructions()})
            origin.insert(0, 0)
    return [Message(m["role"], m["content"]) for m in converted], origin


def _text(content: Any, path: str) -> Any:
    """A message's content: a string, or a list of text parts joined."""
    if not isinstance(content, list):
        return content  # the core checks it is a non-empty string
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{path}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                 "Mixtral-8x7B reads text only", param=f"{path}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _prompts(body: dict[str, Any]) -> tuple[list[Any], bool]:
    """The prompts, texts or token ids, and whether the body sent a single one (errors then name `prompt`, not
    `prompt[0]`)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt], True
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [prompt], True  # one prompt as token ids
    if isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt):
        return prompt, False  # texts, or token-id lists
    raise InvalidRequest("prompt is required: a string, a list of strings, a list of token ids or a list of such "
                         "lists", param="prompt")


def _openai_name(name: str, body: dict[str, Any]) -> str:
    """A parameter of the table as the OpenAI body names it."""
    if name == "max_new_tokens":
        return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if name == "do_sample":
        return "temperature"
    if name == "logprobs" and "messages" in body:
        return "top_logprobs"
    if name == "prompt_logprobs" and body.get("echo") is True:
        return "logprobs"
    return _THEIRS.get(name, name)


def error_body(error: ScoringError) -> dict[str, Any]:
    """OpenAI's error shape, so the SDKs raise their typed errors."""
    return {"error": {"message": error.message, "type": _STATUS_TYPES.get(error.status, "server_error"),
                      "param": error.param, "code": error.code}}


def usage(completions: list[Completion], *, n: int = 1, prompt_only: bool = False) -> dict[str, int]:
    """Each prompt counted once, however many answers it got (they come n by n)."""
    prompt = sum(len(c.prompt_token_ids) for c in completions[::n])
    new = 0 if prompt_only else sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def finish_reason(completion: Completion) -> str:
    # OpenAI has no "time_limit": the server's deadline cut the answer short, as max_tokens does.
    return "length" if completion.finish_reason == "time_limit" else completion.finish_reason


def render(parsed: OpenAIRequest, completions: list[Completion], request_id: str) -> dict[str, Any]:
    head = _head(parsed, request_id, chunk=False)
    choices = []
    for i, completion in enumerate(completions):  # prompt by prompt, each prompt's n answers together
        if parsed.route == "chat":
            message, reason = _answer(parsed, completion)
            logprobs = None if completion.logprobs is None else {"content": [
                _chat_logprob(entry) for entry in completion.logprobs]}
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs})
        else:
            text = completion.text
            if parsed.echo:
                text = completion.prompt_text if parsed.prompt_only else completion.prompt_text + text
            choices.append({"index": i, "text": text, "finish_reason": finish_reason(completion),
                            "logprobs": _completion_logprobs(parsed, completion)})
    return {**head, "choices": choices,
            "usage": usage(completions, n=parsed.request.n, prompt_only=parsed.prompt_only)}


def _chat_logprob(entry: Logprob, *, top: bool = True) -> dict[str, Any]:
    """OpenAI's chat shape of one token: its text, log-probability and UTF-8 bytes, and the alternatives."""
    text = entry.text.decode("utf-8", errors="replace")
    shaped = {"token": text, "logprob": entry.logprob, "bytes": list(entry.text)}
    if top:
        shaped["top_logprobs"] = [_chat_logprob(alternative, top=False) for alternative in entry.top]
    return shaped


def _completion_logprobs(parsed: OpenAIRequest, completion: Completion) -> dict[str, Any] | None:
    """OpenAI's completions shape: `tokens`, `token_logprobs`, `top_logprobs` (a map of token text to
    log-probability) and `text_offset` of each token in the returned text; with echo, the prompt's first."""
    if completion.logprobs is None:
        return None
    entries = list(completion.prompt_logprobs or ()) if parsed.echo else []
    if not parsed.prompt_only:
        entries += completion.logprobs
    shaped = _completion_shape(entries, 0)
    del shaped["end"]
    return shaped


def _completion_shape(entries: Sequence[Logprob], offset: int) -> dict[str, Any]:
    """Tokens in the completions shape, the first at `offset` of the answer's text; `end`: where the next would be."""
    tokens = [entry.text.decode("utf-8", errors="replace") for entry in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [None if entry.logprob is None else {
                alternative.text.decode("utf-8", errors="replace"): alternative.logprob for alternative in entry.top}
                for entry in entries],
            "text_offset": offsets, "end": offset}


def _answer(parsed: OpenAIRequest, completion: Completion) -> tuple[dict[str, Any], str]:
    """The assistant's message and the finish reason: tool calls when the answer is calls, else its text."""
    calls = read_calls(completion.text, parsed.tools) if parsed.tools is not None else None
    if calls is not None:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": completion.text}, finish_reason(completion)


class CallBuffer:
    """A stream's text held back while it may be tool calls, which go out whole at its end (in OpenAI's
    delta shape). With tool_choice auto the grammar parts calls from text at the first character, so text
    streams from there."""

    def __init__(self, parsed: OpenAIRequest) -> None:
        self._tools = parsed.tools
        self.held = False
        self._decided = parsed.tools is None

    def holds(self, text: str) -> bool:
        if not self._decided and text:
            assert self._tools is not None
            self.held = not self._tools.optional or text.startswith("[")
            self._decided = True
        return self.held


class Chunks:
    """A stream's server-sent events in OpenAI's chunk shapes, as vLLM sends them: every answer its own `index`,
    on chat its own assistant-role chunk (all of them with the first generated token, not before generation) and
    its own finish reason; with echo an answer's prompt, and its log-probabilities, first; usage last, summing
    every answer. Each chunk's log-probabilities are those of the tokens whose text it carries: tokens with no
    text yet wait for the next text, and text held back while it may be tool calls goes out whole at its answer's
    end with all of them."""

    def __init__(self, parsed: OpenAIRequest, request_id: str) -> None:
        self._parsed = parsed
        request = parsed.request
        self._answers = request.n * (len(request.prompts) if request.prompts is not None else 1)
        self._head = _head(parsed, request_id, chunk=True)  # one `created` for the whole stream, as vLLM's
        self._calls = [CallBuffer(parsed) for _ in range(self._answers)]
        self._asked = request.settings.logprobs is not None
        self._waiting: list[list[Logprob]] = [[] for _ in range(self._answers)]  # log-probabilities not yet sent
        self._offsets = [0] * self._answers  # completions: each answer's text_offset so far
        self._completions: list[Completion | None] = [None] * self._answers
        self._started = False

    def piece(self, piece: Piece) -> str:
        """The events for one of the core's pieces ("" when it brings nothing to send yet)."""
        events = ""
        if not self._started:
            self._started = True
            if self._parsed.route == "chat":
                events = "".join(self._chunk(i, {"delta": {"role": "assistant", "content": ""}})
                                 for i in range(self._answers))
        i, text = piece.index, piece.text
        if self._parsed.route == "completions":
            if self._parsed.prompt_only:  # the prompt alone is answered; its one generated token is not
                text, piece = "", piece._replace(logprobs=() if self._asked else None)
            if self._parsed.echo and piece.prompt_text is not None:
                text = piece.prompt_text + text
                self._waiting[i].extend(piece.prompt_logprobs or ())
        if piece.logprobs:
            self._waiting[i].extend(piece.logprobs)
        if text and not self._calls[i].holds(text):
            events += self._text(i, text)
        if piece.completion is not None:
            events += self._finish(i, piece.completion)
        return events

    def end(self) -> str:
        """After every answer's last piece: usage, where asked, then [DONE]."""
        events = ""
        if self._parsed.include_usage:
            completions = [c for c in self._completions if c is not None]
            events = _event({**self._head, "choices": [], "usage": usage(
                completions, n=self._parsed.request.n, prompt_only=self._parsed.prompt_only)})
        return events + "data: [DONE]\n\n"

    def _text(self, i: int, text: str) -> str:
        if self._parsed.route == "chat":
            return self._chunk(i, {"delta": {"content": text}}, logprobs=self._logprobs(i))
        return self._chunk(i, {"text": text}, logprobs=self._logprobs(i))

    def _finish(self, i: int, completion: Completion) -> str:
        self._completions[i] = completion
        reason = finish_reason(completion)
        if self._parsed.route == "completions":
            return self._chunk(i, {"text": ""}, reason, self._logprobs(i))
        if not self._calls[i].held:
            return self._chunk(i, {"delta": {}}, reason, self._logprobs(i))
        message, reason = _answer(self._parsed, completion)
        if "tool_calls" in message:
            delta = {"tool_calls": [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]}
        else:
            delta = {"content": completion.text}
        # Held from the answer's first text: all its log-probabilities go with it (none, when screening withheld it).
        self._waiting[i] = list(completion.logprobs or ())
        return self._chunk(i, {"delta": delta}, logprobs=self._logprobs(i)) + self._chunk(i, {"delta": {}}, reason)

    def _logprobs(self, i: int) -> dict[str, Any] | None:
        """The waiting log-probabilities of answer i, in the route's shape; None when there are none."""
        entries = self._waiting[i]
        if not entries:
            return None
        self._waiting[i] = []
        if self._parsed.route == "chat":
            return {"content": [_chat_logprob(entry) for entry in entries]}
        shaped = _completion_shape(entries, self._offsets[i])
        self._offsets[i] = shaped.pop("end")
        return shaped

    def _chunk(self, i: int, fields: dict[str, Any], reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> str:
        choice = {"index": i, **fields, "logprobs": logprobs, "finish_reason": reason}
        return _event({**self._head, "choices": [choice]})


def render_stream_error(error: ScoringError) -> str:
    return _event(error_body(error)) + "data: [DONE]\n\n"


def models(max_model_len: int) -> dict[str, Any]:
    """The served model as OpenAI lists it, with vLLM's fields beside (`vllm bench serve` reads `root`)."""
    return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "mistralai",
                                        "root": MODEL_NAME, "parent": None, "max_model_len": max_model_len}]}


def _head(parsed: OpenAIRequest, request_id: str, *, chunk: bool) -> dict[str, Any]:
    if parsed.route == "chat":
        prefix, kind = "chatcmpl", "chat.completion.chunk" if chunk else "chat.completion"
    else:
        prefix, kind = "cmpl", "text_completion"
    return {"id": f"{prefix}-{request_id}", "object": kind, "created": int(time.time()), "model": MODEL_NAME}


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
