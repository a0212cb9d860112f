"""swagger2.json / swagger3.json stay in step with schemas/ and are what azmlinfsrv serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from mixtral_endpoint.doors.swagger import VERSIONS, build_swagger

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version", VERSIONS)
def test_committed_swagger_matches_the_schemas(version: str):
    committed = json.loads((ROOT / f"swagger{version}.json").read_text())
    assert committed == build_swagger(version), "run `make sample-response` or `mixtral-endpoint swagger`"


@pytest.mark.parametrize("version", VERSIONS)
def test_swagger_is_a_valid_openapi_document(version: str):
    validate(build_swagger(version))


def test_swagger_examples_are_the_sample_files():
    schemas = build_swagger("3")["components"]["schemas"]
    assert schemas["ServiceInput"]["example"] == json.loads((ROOT / "sample-request.json").read_text())
    assert schemas["ServiceOutput"]["example"] == json.loads((ROOT / "sample-response.json").read_text())


@pytest.mark.parametrize("version", VERSIONS)
def test_azmlinfsrv_serves_our_swagger(server: str, version: str):
    response = requests.get(f"{server}/swagger.json", params={"version": version}, timeout=10)
    assert response.status_code == 200
    assert response.json() == json.loads((ROOT / f"swagger{version}.json").read_text())


def test_swagger_describes_every_openai_route_the_server_registers():
    from mixtral_endpoint.doors.openai.routes import ROUTES
    from mixtral_endpoint.doors.swagger import OPENAI_ROUTES

    assert set(OPENAI_ROUTES) == {*ROUTES, "/v1/models", "/info"}
    for version in VERSIONS:
        assert set(OPENAI_ROUTES) <= set(build_swagger(version)["paths"])
