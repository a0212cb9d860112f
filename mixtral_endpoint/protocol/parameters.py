"""Request parameters, each declared once: name, JSON type, bounds, default, meaning, destination.

Everything else follows from this table: the `parameters` of `schemas/request.schema.json` (a
test checks the committed file equals `json_schema()`; `mixtral-endpoint swagger` rewrites it),
the swagger files built from that schema, the engine's `SamplingSettings` (its defaults and its
own bound checks), `protocol.to_settings`, the MLflow signature and the OpenAI names.

Pure: no torch, mlflow or azureml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from mixtral_endpoint.protocol.constraints import RESPONSE_FORMAT_SCHEMA


class _ServerDefault:
    """The default of a parameter whose default the server's settings decide."""

    def __repr__(self) -> str:
        return "SERVER_DEFAULT"


# max_new_tokens: MIXTRAL_DEFAULT_MAX_NEW_TOKENS decides. Never written into the schema or the MLflow
# signature, where a literal default would override the server's (and trip MIXTRAL_MAX_NEW_TOKENS).
SERVER_DEFAULT: Final = _ServerDefault()


@dataclass(frozen=True)
class Parameter:
    name: str
    type: Literal["number", "integer", "boolean", "string", "object", "array"]
    description: str
    default: Any  # a JSON value, None for "unset", or SERVER_DEFAULT
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    max_items: int | None = None  # a string parameter that also takes a list of at most this many strings
    max_length: int | None = None  # characters in each of its strings at most
    shape: dict[str, Any] | None = None  # an object parameter's JSON schema
    # "settings": a field of the engine's SamplingSettings; "request": a field of ScoringRequest.
    goes_to: Literal["settings", "request"] = "settings"
    openai: str | None = None  # its name on the OpenAI routes; None: not offered there
    server_setting: str | None = None  # with SERVER_DEFAULT: the ServerConfig field that decides the default
    mlflow: bool = True  # offered in the MLflow model's params (whose types cannot say a map of token ids)

    @property
    def server_decides_default(self) -> bool:
        return self.default is SERVER_DEFAULT

    def violation(self, value: float) -> str | None:
        """The bound `value` breaks ("must be >= 0"), or None."""
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {_number(self.minimum)}"
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            return f"must be > {_number(self.exclusive_minimum)}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {_number(self.maximum)}"
        return None

    def json_schema(self) -> dict[str, Any]:
        if self.shape is not None:
            schema = dict(self.shape)
        elif self.max_items is not None:
            text = {"type": "string", "minLength": 1, **({"maxLength": self.max_length} if self.max_length else {})}
            schema: dict[str, Any] = {"anyOf": [text, {"type": "array", "maxItems": self.max_items, "items": text}]}
        else:
            schema = {"type": [self.type, "null"] if self.default is None else self.type}
        for keyword, bound in (("minimum", self.minimum), ("exclusiveMinimum", self.exclusive_minimum),
                               ("maximum", self.maximum)):
            if bound is not None:
                schema[keyword] = bound
        if not self.server_decides_default:
            schema["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        schema["description"] = self.description
        return schema


# A stream holds back text that could still open a stop string: up to its length less one character. A
# 60,000-character stop string held a whole answer back to its end; stop strings are words and markers.
STOP_MAX_CHARS = 200
MAX_STOP_STRINGS = 16  # OpenAI's 4 is too few for lm-evaluation-harness (a task's stops and the EOS string)
MAX_LOGPROBS = 20  # alternatives per token at most, as vLLM's --max-logprobs default
MAX_N = 16  # answers per prompt at most
MAX_STOP_TOKEN_IDS = 64
# logit_bias: OpenAI's map of token id (a decimal string, JSON keys being strings) to a bias in [-100, 100].
LOGIT_BIAS_SCHEMA: Final[dict[str, Any]] = {
    "type": "object", "maxProperties": 300,  # its keys, token ids, are checked by protocol/request.py
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
}
STOP_TOKEN_IDS_SCHEMA: Final[dict[str, Any]] = {
    "type": "array", "maxItems": MAX_STOP_TOKEN_IDS, "items": {"type": "integer", "minimum": 0},
}
_SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer

PARAMETERS: Final[tuple[Parameter, ...]] = (
    Parameter("temperature", "number", "Softmax temperature; 0 means greedy.", 1.0,
              minimum=0, maximum=100, openai="temperature"),
    Parameter("top_p", "number", "Nucleus sampling: only the most likely tokens whose probabilities add up to top_p.",
              1.0, exclusive_minimum=0, maximum=1, openai="top_p"),
    Parameter("top_k", "integer", "Top-k sampling; 0 disables it.", 0, minimum=0, openai="top_k"),
    Parameter("do_sample", "boolean", "Sample instead of greedy decoding (greedy also when temperature is 0).", False),
    Parameter("max_new_tokens", "integer",
              "New tokens at most. Default: the server's `MIXTRAL_DEFAULT_MAX_NEW_TOKENS`; "
              "capped by its `MIXTRAL_MAX_NEW_TOKENS`.", SERVER_DEFAULT, minimum=1, openai="max_tokens",
              server_setting="default_max_new_tokens"),
    Parameter("return_full_text", "boolean",
              "Conversation: add `messages`, the conversation with the reply appended; "
              "text: prompt + completion.", False, goes_to="request"),
    Parameter("repetition_penalty", "number",
              "Penalise tokens already in the prompt or the completion; 1.0 disables it.", 1.0,
              exclusive_minimum=0, maximum=10, openai="repetition_penalty"),
    # Stop strings are text; the engine knows only token ids, so the core checks them.
    Parameter("stop", "string", "Generation ends before the first of these strings, which is cut from the text.",
              (), max_items=MAX_STOP_STRINGS, max_length=STOP_MAX_CHARS, goes_to="request", openai="stop"),
    Parameter("seed", "integer", "Makes sampling reproducible; unset, each request draws its own.", None,
              minimum=0, maximum=_SEED_MAX, openai="seed"),
    Parameter("ignore_eos", "boolean", "Keep generating past end-of-sequence.", False, openai="ignore_eos"),
    Parameter("presence_penalty", "number", "Lower the score of each token the answer already holds, once (OpenAI's); "
              "0 disables it.", 0.0, minimum=-2, maximum=2, openai="presence_penalty"),
    Parameter("frequency_penalty", "number", "Lower the score of each token by how often the answer already holds it "
              "(OpenAI's); 0 disables it.", 0.0, minimum=-2, maximum=2, openai="frequency_penalty"),
    Parameter("logit_bias", "object", "Added to a token's score before sampling: `{\"<token id>\": bias}`, each bias "
              "in [-100, 100] (-100 bans the token).", {}, shape=LOGIT_BIAS_SCHEMA, openai="logit_bias", mlflow=False),
    Parameter("min_p", "number", "Drop tokens less likely than min_p times the most likely one; 0 disables it.", 0.0,
              minimum=0, maximum=1, openai="min_p"),
    Parameter("min_tokens", "integer", "New tokens at least before end-of-sequence or a stop token may end the answer.",
              0, minimum=0, openai="min_tokens"),
    Parameter("stop_token_ids", "array", "Generation ends at any of these token ids, which the answer keeps.", (),
              shape=STOP_TOKEN_IDS_SCHEMA, openai="stop_token_ids"),
    Parameter("logprobs", "integer", "The log-probability of each new token, and of this many most likely "
              f"alternatives (0 to {MAX_LOGPROBS}), from the model's distribution before any sampling setting; "
              "unset: none.", None, minimum=0, maximum=MAX_LOGPROBS),
    Parameter("prompt_logprobs", "integer", "The log-probability of each prompt token after the first, and of this "
              f"many most likely alternatives (0 to {MAX_LOGPROBS}); unset: none.", None, minimum=0,
              maximum=MAX_LOGPROBS, openai="prompt_logprobs"),
    Parameter("n", "integer", "Answers per prompt, each sampled on its own (with a seed, answer i uses seed + i).", 1,
              minimum=1, maximum=MAX_N, goes_to="request", openai="n"),
    Parameter("return_token_ids", "boolean", "Add `prompt_token_ids` and `token_ids` to each result.", False,
              goes_to="request"),
    # OpenAI's response_format, plus "regex" and "choice"; the core turns it into the engine's Constraint.
    Parameter("response_format", "object",
              "Constrain the answer: `{\"type\": \"json_object\"}`, `{\"type\": \"json_schema\", \"json_schema\": "
              "{\"name\": ..., \"schema\": {...}}}`, `{\"type\": \"regex\", \"regex\": ...}`, `{\"type\": \"choice\", "
              "\"choice\": [...]}` or `{\"type\": \"text\"}` (none).", {"type": "text"}, shape=RESPONSE_FORMAT_SCHEMA,
              openai="response_format"),
    Parameter("safe_prompt", "boolean", "Put Mistral's guardrail prompt before the conversation, as its system "
              "message. Default: the server's `MIXTRAL_SAFE_PROMPT`. Conversations only.", SERVER_DEFAULT,
              goes_to="request", openai="safe_prompt", server_setting="safe_prompt"),
    Parameter("stream", "boolean", "Answer with server-sent events: text chunks, then one event with "
              "`finish_reason` and `usage`. One conversation or one prompt; /score only.", False,
              goes_to="request", openai="stream"),
)

BY_NAME: Final[dict[str, Parameter]] = {p.name: p for p in PARAMETERS}


def json_schema() -> dict[str, Any]:
    """`$defs.parameters` of the request schema."""
    return {"type": "object", "additionalProperties": False,
            "properties": {p.name: p.json_schema() for p in PARAMETERS}}


def default(name: str) -> Any:
    """A parameter's own default; for one the server decides, ask the server's settings instead."""
    value = BY_NAME[name].default
    assert value is not SERVER_DEFAULT, f"{name}'s default is the server's"
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
