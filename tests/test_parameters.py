"""One table of request parameters: the schema, swagger, MLflow signature, settings and docs/api.md follow it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mixtral_endpoint.doors.mlflow_model.pyfunc import signature
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.parameters import BY_NAME, PARAMETERS, SERVER_DEFAULT, Parameter, json_schema
from mixtral_endpoint.protocol.request import ScoringRequest
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.protocol.validation import load_schema

ROOT = Path(__file__).resolve().parent.parent
NAMES = [p.name for p in PARAMETERS]


def test_committed_request_schema_holds_the_table():
    assert load_schema("request")["$defs"]["parameters"] == json_schema(), "run `mixtral-endpoint swagger`"


@pytest.mark.parametrize("version", ["2", "3"])
def test_committed_swagger_agrees_with_the_table(version: str):
    spec = json.loads((ROOT / f"swagger{version}.json").read_text())
    definitions = spec["definitions"] if version == "2" else spec["components"]["schemas"]
    properties = definitions["Request_parameters"]["properties"]
    assert list(properties) == NAMES
    for p in PARAMETERS:
        swagger = properties[p.name]
        assert swagger.get("default", "unset") == _json_default(p, version), p.name
        assert swagger.get("maximum") == p.maximum, p.name
        assert swagger.get("minimum") == (p.minimum if p.exclusive_minimum is None else p.exclusive_minimum), p.name
        assert swagger.get("type", "string") == p.type, p.name


def _json_default(p: Parameter, version: str) -> object:
    if p.server_decides_default or (p.default is None and version == "2"):  # Swagger 2.0 has no null default
        return "unset"
    return list(p.default) if isinstance(p.default, tuple) else p.default


def test_mlflow_signature_agrees_with_the_table():
    specs = {spec.name: spec for spec in signature().params.params}
    assert list(specs) == [p.name for p in PARAMETERS if p.mlflow] and BY_NAME["logit_bias"].mlflow is False
    types = {"number": "double", "integer": "long", "boolean": "boolean", "string": "string", "array": "long"}
    for p in PARAMETERS:
        if not p.mlflow:  # a map of token ids: MLflow's param types cannot say it
            continue
        if p.type == "object":  # response_format: an MLflow Object with the same properties
            assert {q.name for q in specs[p.name].dtype.properties} == set(p.shape["properties"]), p.name
        else:
            assert specs[p.name].dtype.name == types[p.type], p.name
        expected = None if p.server_decides_default else p.default
        assert specs[p.name].default == (list(expected) if isinstance(expected, tuple) else expected), p.name


def test_max_new_tokens_default_is_the_servers_everywhere():
    """A literal default here would override MIXTRAL_DEFAULT_MAX_NEW_TOKENS (and trip the cap)."""
    assert BY_NAME["max_new_tokens"].default is SERVER_DEFAULT
    assert "default" not in load_schema("request")["$defs"]["parameters"]["properties"]["max_new_tokens"]
    assert next(s for s in signature().params.params if s.name == "max_new_tokens").default is None


def test_every_parameter_lands_in_the_settings_or_the_request():
    settings = {f.name for f in dataclasses.fields(SamplingSettings)}
    request = {f.name for f in dataclasses.fields(ScoringRequest)}
    # response_format arrives as the engine's Constraint (constraints.py).
    assert settings == {p.name for p in PARAMETERS if p.goes_to == "settings"} - {"response_format"} | {"constraint"}
    assert {p.name for p in PARAMETERS if p.goes_to == "request"} <= request
    assert BY_NAME["stop"].goes_to == "request"  # text: the engine knows only token ids


def test_sampling_settings_defaults_are_the_tables():
    settings = SamplingSettings(max_new_tokens=1)
    for f in dataclasses.fields(settings):
        if f.name == "constraint":  # response_format's default, {"type": "text"}: no constraint
            assert settings.constraint is None and BY_NAME["response_format"].default == {"type": "text"}
        elif f.name != "max_new_tokens":  # a map (logit_bias) is held as sorted pairs
            default = BY_NAME[f.name].default
            assert getattr(settings, f.name) == (tuple(default.items()) if isinstance(default, dict) else default)


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("temperature", -0.1, "must be >= 0"),
    ("temperature", 100.5, "must be <= 100"),
    ("temperature", 0, None),
    ("top_p", 0, "must be > 0"),
    ("top_p", 1, None),
    ("top_k", -1, "must be >= 0"),
    ("max_new_tokens", 0, "must be >= 1"),
    ("repetition_penalty", 0.0, "must be > 0"),
    ("seed", 2**63, "must be <= 9223372036854775807"),
])
def test_bounds_are_checked_from_the_table(name: str, value: float, problem: str | None):
    assert BY_NAME[name].violation(value) == problem
    if name != "seed" and problem is not None:
        with pytest.raises(ValueError, match=f"{name} {problem}"):
            SamplingSettings(**{"max_new_tokens": 4, name: value})


def test_openai_names_are_unique():
    names = [p.openai for p in PARAMETERS if p.openai is not None]
    assert len(names) == len(set(names)) and BY_NAME["max_new_tokens"].openai == "max_tokens"


def _readme_kind(p: Parameter) -> str:
    if p.max_items is not None:
        longest = f" of {p.max_length} characters at most" if p.max_length else ""
        return f"string or up to {p.max_items} strings{longest}"
    shown = {2**63 - 1: "2^63-1"}
    low, strict = (p.exclusive_minimum, True) if p.exclusive_minimum is not None else (p.minimum, False)
    if p.maximum is not None:
        high = shown.get(p.maximum, f"{p.maximum:g}")
        return f"{low:g} {'<' if strict else '<='} {p.type} <= {high}"
    return p.type if low is None else f"{p.type} {'>' if strict else '>='} {low:g}"


def _readme_default(p: Parameter) -> str:
    if p.server_decides_default:  # the setting that decides, and what it decides when left unset
        config = ServerConfig()
        value = config.limits.default_max_new_tokens if p.name == "max_new_tokens" else json.dumps(
            getattr(config, p.server_setting))
        return f"`MIXTRAL_{p.server_setting.upper()}` ({value})"
    if p.default in (None, ()):
        return "none"
    return json.dumps(p.default)


def test_every_default_the_server_decides_names_the_setting_that_does():
    config_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    for p in PARAMETERS:
        assert (p.server_setting in config_fields) == p.server_decides_default, p.name


def test_readme_parameter_table_is_the_table():
    rows = [f"| `{p.name}` | {_readme_kind(p)} | {_readme_default(p)} | {p.description} |" for p in PARAMETERS]
    readme = (ROOT / "docs" / "api.md").read_text()
    missing = [row for row in rows if row not in readme]
    assert not missing, "docs/api.md rows to write:\n" + "\n".join(missing)
