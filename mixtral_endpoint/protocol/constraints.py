"""What a request may hold its answer to: a JSON schema, any JSON object, a regex, or a choice among strings.

/score and the OpenAI routes both take it as `response_format` (OpenAI's object, with two more types:
`regex` and `choice`); tool calling builds one from the tools. A Constraint is a frozen value the engine
settings carry; grammar.py compiles it. Schemas are checked here, before any engine sees them: a schema
that is not one, or that uses a keyword the grammar compiler (xgrammar 0.2.8) would silently drop, is a
400 naming the field and the keyword, so every answer that completes validates against its schema. What one
constraint may hold is bounded (the MAX_ constants below), each bound a 400 naming the field and the limit.

Pure: no torch, xgrammar, azureml or mlflow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from mixtral_endpoint.protocol.errors import InvalidRequest

RESPONSE_FORMAT_TYPES: Final = ("text", "json_object", "json_schema", "regex", "choice")
_TEXT = {"type": "string", "minLength": 1}
# The parameter's JSON schema (parameters.py declares the parameter with it).
RESPONSE_FORMAT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type"],
    "properties": {
        "type": {"enum": list(RESPONSE_FORMAT_TYPES)},
        "json_schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["schema"],
            "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                           "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}},
        },
        "regex": _TEXT,
        "choice": {"type": "array", "minItems": 1, "items": _TEXT},
    },
}
# What one constraint may hold: its grammar's compile time and memory grow with each. Measured with xgrammar
# 0.2.8 on the v1 vocabulary: 256 choices of 256 characters compile to 13 MB in 0.3 s.
MAX_REGEX_CHARS: Final = 1024
MAX_CHOICES: Final = 256
MAX_CHOICE_CHARS: Final = 256
# Objects and arrays nested in one another. jsonschema checks a schema recursively, ~10 frames a level: 32
# levels leave most of Python's 1000 to the server's own stack. OpenAI allows 10 levels of objects (~20 here).
MAX_SCHEMA_DEPTH: Final = 32
MAX_SCHEMA_BYTES: Final = 32_768  # as compact UTF-8 JSON; the tools of a request count together
# A lone surrogate (JSON's "\ud800" alone) is no character of any UTF-8 text: no answer could match it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# Keywords xgrammar 0.2.8 compiles as if they were absent (checked by tests/test_constraints.py), so an
# answer would not validate: refused rather than ignored.
_DROPPED_KEYWORDS: Final = ("not", "if", "then", "else", "dependentSchemas")


@dataclass(frozen=True)
class Constraint:
    kind: Literal["json_schema", "regex", "choice"]
    value: str  # the schema as canonical JSON, the regex, or the choices as a JSON array
    # tool_choice "auto": the schema, or plain text that does not open like JSON (`[`, `{` or a blank).
    or_text: bool = False
    param: str = field(default="", compare=False)  # the request field it came from, for errors

    @classmethod
    def json_schema(cls, schema: dict[str, Any], *, param: str = "", or_text: bool = False) -> Constraint:
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")), or_text, param)

    @classmethod
    def choice(cls, choices: list[str], *, param: str = "") -> Constraint:
        return cls("choice", json.dumps(choices), param=param)


def from_response_format(response_format: dict[str, Any], param: str) -> Constraint | None:
    """A validated `response_format` (RESPONSE_FORMAT_SCHEMA) as a Constraint; None for `text`."""
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind != "json_object" and kind not in response_format:  # said here: swagger 2's schemas have no if/then
        raise InvalidRequest(f"{param}.{kind} is required when {param}.type is {kind}", param=f"{param}.{kind}")
    if kind == "json_object":
        return Constraint.json_schema({"type": "object"}, param=param)
    if kind == "json_schema":
        schema = response_format["json_schema"]["schema"]
        check_schema(schema, f"{param}.json_schema.schema")
        return Constraint.json_schema(schema, param=f"{param}.json_schema.schema")
    if kind == "regex":
        regex = response_format["regex"]
        _check_text(regex, f"{param}.regex", MAX_REGEX_CHARS)
        return Constraint("regex", regex, param=f"{param}.regex")
    choices = response_format["choice"]
    if len(choices) > MAX_CHOICES:
        raise InvalidRequest(f"{param}.choice has {len(choices)} choices; at most {MAX_CHOICES} are allowed",
                             param=f"{param}.choice")
    for i, choice in enumerate(choices):
        _check_text(choice, f"{param}.choice[{i}]", MAX_CHOICE_CHARS)
    return Constraint.choice(choices, param=f"{param}.choice")


def _check_text(text: str, param: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidRequest(f"{param} is {len(text)} characters; at most {limit} are allowed", param=param)
    if (lone := _LONE_SURROGATE.search(text)) is not None:
        raise InvalidRequest(f"{param} holds a lone surrogate (U+{ord(lone.group()):04X}), which no text can hold",
                             param=param)


def schema_bytes(schema: Any) -> int:
    """The schema's size as compact UTF-8 JSON, what MAX_SCHEMA_BYTES bounds."""
    return len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def check_schema(schema: Any, param: str) -> None:
    """Raises InvalidRequest, naming `param` and the keyword, for a schema no grammar can hold answers to."""
    _check_depth(schema, param)  # first: what follows recurses, one level (jsonschema's: ~10 frames) at a time
    if (size := schema_bytes(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"{param} is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed", param=param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise InvalidRequest(f"{param} is not a valid JSON schema: at {where or 'its top'}: {exc.message}",
                             param=param + where) from None
    problem = _dropped_keyword(schema, "")
    if problem is not None:
        where, keyword = problem
        raise InvalidRequest(f"{param}{where} uses '{keyword}', which the grammar compiler cannot enforce; "
                             f"supported are type, properties, required, items, prefixItems, enum, const, anyOf, "
                             f"oneOf, $ref, $defs, minimum/maximum, minLength/maxLength, pattern, format and "
                             f"minItems/maxItems", param=param + where)


def _check_depth(schema: Any, param: str) -> None:
    stack = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                raise InvalidRequest(f"{param} nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep; at most "
                                     f"{MAX_SCHEMA_DEPTH} levels are allowed", param=param)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))


def _dropped_keyword(schema: Any, where: str) -> tuple[str, str] | None:
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            if (found := _dropped_keyword(item, f"{where}[{i}]")) is not None:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for keyword in _DROPPED_KEYWORDS:
        if keyword in schema:
            return where, keyword
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return where, "allOf"  # xgrammar keeps one of them
    declared = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    if isinstance(schema.get("required"), list) and any(name not in declared for name in schema["required"]):
        return where, "required of a property that properties does not declare"  # xgrammar drops it
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return where, "$ref"  # a remote reference: nothing here fetches it
    for key, value in schema.items():
        # Under properties and $defs the keys are names, not keywords: look only inside their values.
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            for name, sub in value.items():
                if (found := _dropped_keyword(sub, f"{where}.{key}.{name}")) is not None:
                    return found
        elif key not in ("enum", "const", "default", "examples") and (found := _dropped_keyword(
                value, f"{where}.{key}")) is not None:
            return found
    return None
