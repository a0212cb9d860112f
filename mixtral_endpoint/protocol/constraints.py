"""What a request may hold its answer to: a JSON schema, any JSON object, a regex, or a choice among strings.

/score and the OpenAI routes both take it as `response_format` (OpenAI's object, with two more types:
`regex` and `choice`); tool calling builds one from the tools. A Constraint is a frozen value the engine
settings carry; grammar.py compiles it. Schemas are checked here, before any engine sees them: a schema
that is not one, or that uses a keyword the grammar compiler (xgrammar 0.2.8) would silently drop, is a
400 naming the field and the keyword, so every answer that completes validates against its schema.

Pure: no torch, xgrammar, azureml or mlflow.
"""

from __future__ import annotations

import json
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
        return Constraint("regex", response_format["regex"], param=f"{param}.regex")
    return Constraint.choice(response_format["choice"], param=f"{param}.choice")


def check_schema(schema: Any, param: str) -> None:
    """Raises InvalidRequest, naming `param` and the keyword, for a schema no grammar can hold answers to."""
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
