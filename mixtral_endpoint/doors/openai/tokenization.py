"""vLLM's tokenizer routes, which evaluation and benchmark tools ask of an OpenAI server: `POST /tokenize`,
`POST /detokenize`, `GET /tokenizer_info`, `GET /version`.

Through the core's own tokenizer (mistral-common), token-exact with what generation takes: a chat's
`messages` are parsed as the chat route parses them (tools and the guardrail prompt included) and encoded
as the core encodes them; a `prompt` is a text prompt, with BOS unless `add_special_tokens` is false.
lm-evaluation-harness reads `eos_token` from `/tokenizer_info` and `tokens` from `/tokenize`; `vllm bench
serve` counts with `/tokenize` and checks `/detokenize`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import flask

from mixtral_endpoint.doors.openai import protocol as openai
from mixtral_endpoint.protocol.errors import InvalidRequest, ModelNotReady, as_scoring_error
from mixtral_endpoint.protocol.validation import clip
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger(__name__)

_TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                    "continue_final_message", "return_token_strs", "tools", "tool_choice"}


def register(blueprint: flask.Blueprint, scorer: Callable[[], Scorer | None]) -> None:
    for path, name, answer, method in (("/tokenize", "vllm_tokenize", tokenize, "POST"),
                                       ("/detokenize", "vllm_detokenize", detokenize, "POST"),
                                       ("/tokenizer_info", "vllm_tokenizer_info", tokenizer_info, "GET"),
                                       ("/version", "vllm_version", lambda scorer, body: _version(), "GET")):
        blueprint.add_url_rule(path, name, lambda answer=answer: _serve(answer, scorer()), methods=[method])


def tokenize(scorer: Scorer, body: Any) -> dict[str, Any]:
    """`{"prompt"}` or `{"messages"}` -> `{"count", "max_model_len", "tokens", "token_strs"}`."""
    _check_object(body, _TOKENIZE_FIELDS)
    if ("prompt" in body) == ("messages" in body):
        raise InvalidRequest("send prompt (a text) or messages (a chat), one of them", param="prompt")
    if "messages" in body:
        chat = {k: body[k] for k in ("messages", "tools", "tool_choice") if k in body}
        request = openai.parse({**chat, "max_tokens": 1}, "chat", scorer.config.limits, extra_parameters=None).request
        (tokens,) = scorer.encode(request)
    else:
        prompt, special = body["prompt"], body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string", param="prompt")
        if not isinstance(special, bool):
            raise InvalidRequest("add_special_tokens must be a boolean", param="add_special_tokens")
        tokens = scorer.tokenizer.encode_text(prompt, bos=special)
    strs = [scorer.tokenizer.piece(t) for t in tokens] if body.get("return_token_strs") is True else None
    return {"count": len(tokens), "max_model_len": scorer.max_total_tokens, "tokens": tokens, "token_strs": strs}


def detokenize(scorer: Scorer, body: Any) -> dict[str, Any]:
    """`{"tokens": [ids]}` -> `{"prompt": text}`."""
    _check_object(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise InvalidRequest("tokens is required: a list of token ids", param="tokens")
    for i, token in enumerate(tokens):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < scorer.tokenizer.vocab_size:
            raise InvalidRequest(f"tokens[{i}] must be a token id in [0, {scorer.tokenizer.vocab_size})",
                                 param=f"tokens[{i}]")
    return {"prompt": scorer.tokenizer.decode(tokens)}


def tokenizer_info(scorer: Scorer, body: Any) -> dict[str, Any]:
    tokenizer = scorer.tokenizer
    return {"tokenizer_class": "MistralTokenizer", "bos_token": tokenizer.piece(tokenizer.bos_id),
            "eos_token": tokenizer.piece(tokenizer.eos_id), "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
            "model_max_length": scorer.max_total_tokens}


def _version() -> dict[str, str]:
    return {"version": version("mixtral-endpoint")}


def _serve(answer: Callable[[Scorer, Any], dict[str, Any]], scorer: Scorer | None) -> flask.Response:
    try:
        if scorer is None:
            raise ModelNotReady("the model is still loading; try again shortly", retry_after=30)
        body = None
        if flask.request.method == "POST":
            body = scorer.read_json(flask.request.stream, declared_length=flask.request.content_length)
        return _json(answer(scorer, body))
    except Exception as exc:  # a typed error in OpenAI's shape, never a traceback
        error = as_scoring_error(exc, log)
        return _json(openai.error_body(error), error.status, error.headers())


def _check_object(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise InvalidRequest(f"unknown field '{clip(unknown[0])}'; allowed: {', '.join(sorted(allowed))}",
                             param=clip(unknown[0]))


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    return flask.Response(flask.json.dumps(body), status=status, headers=headers, mimetype="application/json")
