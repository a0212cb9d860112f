"""The core's request and its answers: what every door parses its own API into (`build_request`) and renders
back from (`Completion`). Pure: no torch, azureml or mlflow.

A door hands over the conversation or the prompts and the parameters by the table's names, not yet checked,
and says how its own API names each field (`Fields`), so that every error names the field the caller sent:
`/score`'s `parameters.max_new_tokens` is OpenAI's `max_tokens`. The parameters are checked against the
table's own schema (types, bounds, unknown names), then the rules a schema cannot say (role order, the
server's caps), the same for every door.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator

from mixtral_endpoint.protocol.constraints import from_response_format
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.parameters import PARAMETERS, Parameter, default, json_schema
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.protocol.validation import check, check_unicode, clip, json_path, json_type

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
    prompts: tuple[str | tuple[int, ...], ...] | None  # text, or token ids taken as they are (no BOS added)
    settings: SamplingSettings
    return_full_text: bool
    return_token_ids: bool
    stream: bool = False
    n: int = 1  # answers per prompt; completions come prompt by prompt, each prompt's n together
    stop: tuple[str, ...] = ()  # text, so checked in the core: the engine knows only token ids
    safe_prompt: bool | None = None  # None: the server's MIXTRAL_SAFE_PROMPT
    fields: Fields | None = field(default=None, compare=False)  # how the door names its fields, for the core's errors

    @property
    def is_chat(self) -> bool:
        return self.conversation is not None


@dataclass(frozen=True)
class Logprob:
    """A token at one place of a text, and how likely the model found it there."""

    token_id: int
    text: bytes  # what the token adds to the text (a byte-fallback token: one byte of a character)
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: tuple[Logprob, ...] = ()  # the most likely tokens at that place, most likely first


@dataclass(frozen=True)
class Completion:
    """One answer to one prompt, ready to render."""

    text: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_text: str = ""  # a text prompt as the model read it (token ids decoded); "" for a conversation
    logprobs: tuple[Logprob, ...] | None = None  # one per token id, where the request asked
    prompt_logprobs: tuple[Logprob, ...] | None = None  # one per prompt token id, where the request asked


class Piece(NamedTuple):
    """A stream's next text of one answer (a plain tuple: one goes out per token, so it costs little). Where the
    request asked for log-probabilities, the tokens whose text the piece completes; an answer's last piece also
    carries what is left (its EOS, the tokens of a stop string) and its Completion."""

    index: int  # the answer, numbered as complete() orders them: prompt by prompt, each prompt's n together
    text: str
    logprobs: tuple[Logprob, ...] | None = None  # None where the request did not ask
    completion: Completion | None = None  # on the answer's last piece
    prompt_text: str | None = None  # on an answer's first piece, for a text prompt: as the model read it
    prompt_logprobs: tuple[Logprob, ...] | None = None  # on an answer's first piece, where the request asked


@dataclass(frozen=True)
class Fields:
    """How a door's API names the fields of the core's request, for errors."""

    input: str  # the field holding the conversation or the prompts
    message: Callable[[int], str]  # the conversation's message i
    prompt: Callable[[int], str]  # prompt i
    parameter: Callable[[str], str]  # a parameter, by the table's name


def build_request(*, conversation: Sequence[Message] | None = None, prompts: Sequence[Any] | None = None,
                  parameters: Mapping[str, Any], limits: RequestLimits, fields: Fields) -> ScoringRequest:
    """The core's request from a door's conversation (messages whose content is not yet checked) or text
    prompts, and its parameters by the table's names; raises InvalidRequest naming the door's field."""
    check_parameters(parameters, fields.parameter)
    check_unicode(parameters.get("stop", []), fields.parameter("stop"))
    if not (conversation if conversation is not None else prompts):
        raise InvalidRequest(f"{fields.input} must not be empty", param=fields.input)
    if conversation is not None:
        conversation = tuple(conversation)
        for i, message in enumerate(conversation):
            _check_text(message.content, fields.message(i) + ".content")
        _check_conversation(conversation, fields)
    else:
        assert prompts is not None
        prompts = tuple(prompts)
        if len(prompts) > limits.max_prompts:
            raise InvalidRequest(f"{len(prompts)} prompts in one request; at most {limits.max_prompts} are allowed",
                                 param=fields.input)
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list | tuple):
                _check_token_ids(prompt, fields.prompt(i))
            else:
                _check_text(prompt, fields.prompt(i))
        prompts = tuple(tuple(p) if isinstance(p, list) else p for p in prompts)
    stream = parameters.get("stream", default("stream"))
    n = parameters.get("n", default("n"))
    stop = parameters.get("stop", default("stop"))
    return ScoringRequest(
        conversation=conversation,
        prompts=prompts,
        settings=to_settings(parameters, limits, fields.parameter),
        return_full_text=parameters.get("return_full_text", default("return_full_text")),
        return_token_ids=parameters.get("return_token_ids", default("return_token_ids")),
        stream=stream,
        n=n,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        safe_prompt=parameters.get("safe_prompt"),
        fields=fields,
    )


def to_settings(params: Mapping[str, Any], limits: RequestLimits,
                name: Callable[[str], str] = lambda n: f"parameters.{n}") -> SamplingSettings:
    """Converts validated request parameters into engine settings, once, by name.

    Parameters left out take SamplingSettings' defaults, which are the table's; max_new_tokens,
    whose default is the server's, is the one place its cap is checked. response_format becomes the
    settings' Constraint.
    """
    values: dict[str, Any] = {p.name: _typed(p, params[p.name]) for p in PARAMETERS
                              if p.goes_to == "settings" and p.shape is None and p.name in params}
    if params.get("response_format") is not None:
        values["constraint"] = from_response_format(params["response_format"], name("response_format"))
    if params.get("logit_bias"):
        for token in params["logit_bias"]:
            if not (token.isascii() and token.isdecimal()):
                raise InvalidRequest(f"{name('logit_bias')} maps token ids, written as decimal strings; got "
                                     f"{clip(token)!r}", param=name("logit_bias"))
        values["logit_bias"] = tuple(sorted((int(token), float(bias)) for token, bias in params["logit_bias"].items()))
    if params.get("stop_token_ids"):
        values["stop_token_ids"] = tuple(int(token) for token in params["stop_token_ids"])
    max_new_tokens = values.setdefault("max_new_tokens", limits.default_max_new_tokens)
    if max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens is {max_new_tokens}; this server allows at most {limits.max_new_tokens}",
                             param=name("max_new_tokens"))
    if values.get("min_tokens", 0) > max_new_tokens:
        raise InvalidRequest(f"min_tokens is {values['min_tokens']}, above max_new_tokens ({max_new_tokens})",
                             param=name("min_tokens"))
    return SamplingSettings(**values)


def check_parameters(parameters: Mapping[str, Any], name: Callable[[str], str]) -> None:
    """Raises InvalidRequest for a value the parameters table does not allow (type, bound, unknown name)."""

    def path_of(parts: Sequence[str | int]) -> str:
        first, *rest = parts  # the table's schema fails inside a parameter, never at the mapping itself
        return name(str(first)) + json_path(["x", *rest])[1:]

    check(_parameters_validator(), parameters, path_of, key="parameter")


@cache
def _parameters_validator() -> Draft202012Validator:
    return Draft202012Validator(json_schema())


def _typed(parameter: Parameter, value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; the engine gets real ints (and floats, not ints, for numbers).
    convert = _PYTHON_TYPES.get(parameter.type)
    return value if convert is None or value is None else convert(value)


def _check_text(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"{path} must be a string, got {json_type(value)}", param=path)
    if not value:
        raise InvalidRequest(f"{path} must not be empty", param=path)
    check_unicode(value, path)


def _check_token_ids(ids: Sequence[Any], path: str) -> None:
    """Token ids a door took as a prompt: non-negative integers (the core checks them against the vocabulary)."""
    if not ids:
        raise InvalidRequest(f"{path} must not be empty", param=path)
    for j, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidRequest(f"{path}[{j}] must be a token id (an integer >= 0), got {json_type(token)}",
                                 param=f"{path}[{j}]")


def _check_conversation(conversation: tuple[Message, ...], fields: Fields) -> None:
    turns = conversation[1:] if conversation and conversation[0].role == "system" else conversation
    offset = len(conversation) - len(turns)
    if not turns:
        raise InvalidRequest("the conversation has only a system message; it must end with a user message",
                             param=fields.input)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = "only first" if message.role == "system" else f"'{expected}' expected"
            raise InvalidRequest(
                f"message {i + offset} has role '{message.role}' ({where}); roles must alternate "
                "user/assistant after an optional leading system message",
                param=fields.message(i + offset) + ".role",
            )
    if turns[-1].role != "user":
        raise InvalidRequest("the conversation must end with a user message",
                             param=fields.message(len(conversation) - 1) + ".role")
