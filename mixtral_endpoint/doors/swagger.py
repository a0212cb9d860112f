"""swagger2.json and swagger3.json, generated from schemas/ so the API describes itself.

`mixtral-endpoint swagger` first writes the parameters table (parameters.py) into
schemas/request.schema.json, then the swagger files from the schemas.

azmlinfsrv serves them from the entry script's folder at `GET /swagger.json?version=2|3`, and
Azure ML's endpoint page shows them. They start from azmlinfsrv's own templates; only the
request and response schemas (with the sample request and response as examples) are ours.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from azureml_inference_server_http.constants import SERVER_ROOT

from mixtral_endpoint.protocol.parameters import json_schema as parameters_schema
from mixtral_endpoint.protocol.validation import SCHEMA_DIR, load_schema

ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAME = "mixtral-8x7b"
SERVICE_VERSION = "1.0"
VERSIONS = ("2", "3")


def build_swagger(version: str) -> dict[str, Any]:
    template = (Path(SERVER_ROOT) / f"swagger{version}_template.json").read_text()
    spec = json.loads(template.replace("$SERVICE_NAME$", SERVICE_NAME)
                      .replace("$SERVICE_VERSION$", SERVICE_VERSION).replace("$PATH_PREFIX$", ""))
    ref_root = "#/definitions/" if version == "2" else "#/components/schemas/"
    schemas = spec["definitions"] if version == "2" else spec["components"]["schemas"]
    for name, example_file, target in (("request", "sample-request.json", "ServiceInput"),
                                       ("response", "sample-response.json", "ServiceOutput")):
        schema = copy.deepcopy(load_schema(name))
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[_def_name(name, def_name)] = _convert(definition, version, ref_root, name)
        schema = _convert(schema, version, ref_root, name)
        schema["example"] = json.loads((ROOT / example_file).read_text())
        schemas[target] = schema
    ours = {"$ref": ref_root + _def_name("response", "error_response")}
    # 4xx/5xx from score.py have our error shape; azmlinfsrv's own failures keep its {"message"} shape.
    schemas["ErrorResponse"] = ours if version == "2" else {"anyOf": [ours, schemas["ErrorResponse"]]}
    for def_name, definition in load_schema("openai")["$defs"].items():
        schemas[_def_name("openai", def_name)] = _convert(definition, version, ref_root, "openai")
    spec["paths"].update(_openai_paths(version, ref_root))
    return spec


# The OpenAI / Azure AI Model Inference routes (doors/openai/routes.py): path -> (method, request, response, what).
OPENAI_ROUTES = {
    "/v1/chat/completions": ("post", "chat_request", "chat_completion", "OpenAI chat completions"),
    "/chat/completions": ("post", "chat_request", "chat_completion", "Azure AI Model Inference chat completions"),
    "/v1/completions": ("post", "completion_request", "text_completion", "OpenAI text completions"),
    "/completions": ("post", "completion_request", "text_completion", "text completions"),
    "/v1/models": ("get", None, "model_list", "the served model"),
    "/info": ("get", None, "model_info", "Azure AI Model Inference model information"),
}


def _openai_paths(version: str, ref_root: str) -> dict[str, Any]:
    def ref(name: str) -> dict[str, str]:
        return {"$ref": ref_root + _def_name("openai", name)}

    def body(name: str, description: str) -> dict[str, Any]:
        if version == "2":
            return {"description": description, "schema": ref(name)}
        return {"description": description, "content": {"application/json": {"schema": ref(name)}}}

    paths: dict[str, Any] = {}
    for path, (method, request, response, what) in OPENAI_ROUTES.items():
        operation: dict[str, Any] = {
            "operationId": "openai" + path.replace("/", "_"), "description": what,
            "responses": {"200": body(response, what), "default": body("error_response", "OpenAI's error shape")},
        }
        if request is not None and version == "2":
            operation["parameters"] = [{"in": "body", "name": "body", "required": True, "schema": ref(request)}]
        elif request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        paths[path] = {method: operation}
    return paths


def write_request_schema(schema_dir: Path = SCHEMA_DIR) -> Path:
    """Rewrites the request schema's `parameters` from the parameters table."""
    path = schema_dir / "request.schema.json"
    schema = json.loads(path.read_text())
    schema["$defs"]["parameters"] = parameters_schema()
    path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    load_schema.cache_clear()
    return path


def write_swagger(out_dir: Path = ROOT) -> list[Path]:
    written = []
    for version in VERSIONS:
        path = out_dir / f"swagger{version}.json"
        path.write_text(json.dumps(build_swagger(version), indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def _def_name(schema_name: str, def_name: str) -> str:
    return f"{schema_name.capitalize()}_{def_name}"


def _convert(node: Any, version: str, ref_root: str, schema_name: str) -> Any:
    """JSON Schema 2020-12 -> OpenAPI 3.0 / Swagger 2.0 schema objects."""
    if isinstance(node, list):
        return [_convert(item, version, ref_root, schema_name) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("$schema", "$id") or (key == "default" and value is None and version == "2"):
            continue
        if key == "const":
            out["enum"] = [value]  # OpenAPI 3.0 and Swagger 2.0 have no const
        elif key == "$ref":
            out["$ref"] = ref_root + _def_name(schema_name, value.rsplit("/", 1)[1])
        elif key == "type" and isinstance(value, list):
            out["type"] = next(t for t in value if t != "null")
            out["x-nullable" if version == "2" else "nullable"] = True
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key in ("anyOf", "oneOf") and version == "2":
            # Swagger 2.0 has no anyOf/oneOf: keep the alternatives as a vendor extension.
            out[f"x-{key}"] = _convert(value, version, ref_root, schema_name)
        elif key == "properties":
            out[key] = {name: _convert(v, version, ref_root, schema_name) for name, v in value.items()}
        else:
            out[key] = _convert(value, version, ref_root, schema_name)
    return out
