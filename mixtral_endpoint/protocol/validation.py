"""JSON in, and JSON schema failures out as errors that name the caller's field. Pure: no torch, azureml or
mlflow.

Every door reads JSON with `parse_json` and checks it against a schema (`schemas/`, or the parameters
table's); `schema_error` turns jsonschema's failures into one `InvalidRequest` whose `param` is the field as
that door's API names it (the door says how, through `path_of`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from mixtral_endpoint.protocol.errors import InvalidRequest

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
# A JSON path inside the checked value (keys and indexes) -> the field as the door's API names it.
PathOf = Callable[[Sequence[str | int]], str]


@cache
def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def parse_json(body: bytes | str) -> Any:
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {_short_json_error(exc)}") from None
    except RecursionError:
        raise InvalidRequest("the request body is not valid JSON: nested too deeply") from None


def check(validator: Draft202012Validator, value: Any, path_of: PathOf, *, key: str = "field") -> None:
    """Raises InvalidRequest for the failure that best says what is wrong with `value`; an unknown key is
    called a `key` ("unknown parameter 'x'")."""
    errors = list(validator.iter_errors(value))
    if errors:
        any_of = [e for e in errors if e.validator == "anyOf"]
        raise _invalid(_deepest(any_of[0]) if any_of else best_match(errors), path_of, key)


def check_unicode(value: Any, path: str) -> None:
    """JSON's \\ud800-style escapes can carry lone surrogates, which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{path} holds a lone UTF-16 surrogate; it is not valid Unicode text",
                                 param=path) from None
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_unicode(item, f"{path}[{i}]")


def json_path(parts: Sequence[str | int]) -> str:
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"\w+", part):  # a key that is not a plain name is quoted: parameters["a b"]
            path += f".{clip(part)}" if path else clip(part)
        else:
            path += f"[{json.dumps(clip(part), ensure_ascii=False)}]"
    return path


def clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value: Any) -> str:
    for name, kind in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                       ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and a NaN temperature passes every bound.
    raise ValueError(f"{name} is not a JSON value")


def _invalid(error: ValidationError, path_of: PathOf, key: str) -> InvalidRequest:
    parts = list(error.absolute_path)
    kind, instance, schema = error.validator, error.instance, error.schema
    if kind == "additionalProperties":
        allowed = schema.get("properties", {})
        name = sorted(k for k in instance if k not in allowed)[0]
        return InvalidRequest(f"unknown {key} '{clip(name)}'; allowed: {', '.join(allowed)}",
                              param=path_of([*parts, name]))
    if kind == "required":
        name = next(k for k in error.validator_value if k not in instance)
        return InvalidRequest(f"'{name}' is required", param=path_of([*parts, name]))
    path = path_of(parts)
    field = path or "body"
    messages = {
        "type": lambda: f"{field} must be {_types(error.validator_value)}, got {json_type(instance)}",
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
    # The two anyOf in the schemas: input_string (0 conversation, 1 prompts), stop (0 string, 1 list).
    if isinstance(instance, list) and instance:
        return 0 if isinstance(instance[0], dict) else 1
    if isinstance(instance, list):
        return None
    return 0 if isinstance(instance, str) else None


def _types(expected: str | list[str]) -> str:
    names = [expected] if isinstance(expected, str) else expected
    return " or ".join(n if n == "null" else ("an " if n[0] in "aeiou" else "a ") + n for n in names)


def _short_json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)
