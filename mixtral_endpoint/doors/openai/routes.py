"""The OpenAI and Azure AI Model Inference routes, on azmlinfsrv's own blueprint: one more door.

azmlinfsrv serves only `/`, `/score` and `/swagger.json`, but it imports the entry script and runs
`init()` before it registers its Flask blueprint, so rules that `init()` adds to that blueprint are
served with its request ids, access log and error handling (azureml-inference-server-http 1.5.1,
pinned; `tests/test_openai.py` fails if a new version stops serving them).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator

import flask

from mixtral_endpoint.doors.openai import protocol as openai
from mixtral_endpoint.protocol.errors import ModelNotReady, ScoringError, as_scoring_error
from mixtral_endpoint.protocol.request import Piece
from mixtral_endpoint.serving.metrics import CONTENT_TYPE
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger(__name__)

ROUTES: dict[str, openai.Route] = {"/v1/chat/completions": "chat", "/chat/completions": "chat",
                                   "/v1/completions": "completions", "/completions": "completions"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def register(blueprint: flask.Blueprint, scorer: Callable[[], Scorer | None]) -> None:
    """Adds the routes to azmlinfsrv's blueprint; `scorer` gives the loaded core (None before init)."""
    for path, route in ROUTES.items():
        blueprint.add_url_rule(path, f"openai_{path.strip('/').replace('/', '_')}",
                               lambda route=route: _completion(route, scorer()), methods=["POST"])
    blueprint.add_url_rule("/v1/models", "openai_models", lambda: _models(scorer()), methods=["GET"])
    blueprint.add_url_rule("/info", "azure_model_info", lambda: _json(openai.MODEL_INFO), methods=["GET"])
    # Prometheus's scrape and vLLM's health route, beside them: vLLM's metric names, from the core
    # (serving/metrics.py); azmlinfsrv's own `GET /` answers "Healthy" whatever the engine's state.
    blueprint.add_url_rule("/metrics", "prometheus_metrics", lambda: _metrics(scorer()), methods=["GET"])
    blueprint.add_url_rule("/health", "engine_health", lambda: _health(scorer()), methods=["GET"])


def _completion(route: openai.Route, scorer: Scorer | None) -> flask.Response:
    flask.g.api_name = flask.request.path  # azmlinfsrv's access log line
    request_id = flask.g.get("request_id") or uuid.uuid4().hex
    try:
        if scorer is None:
            raise ModelNotReady("the model is still loading; try again shortly", retry_after=30)
        body = scorer.read_json(flask.request.stream, declared_length=flask.request.content_length)
        parsed = openai.parse(body, route, scorer.config.limits,
                              extra_parameters=flask.request.headers.get("extra-parameters"))
        if parsed.request.stream:
            events = scorer.stream(parsed.request, request_id)
            return flask.Response(_events(parsed, events, request_id), mimetype="text/event-stream",
                                  headers=SSE_HEADERS)
        return _json(openai.render(parsed, scorer.complete(parsed.request, request_id), request_id))
    except Exception as exc:  # the caller gets a typed error in OpenAI's shape, never a traceback
        error = as_scoring_error(exc, log)
        return _json(openai.error_body(error), error.status, error.headers())


def _events(parsed: openai.OpenAIRequest, events: Iterator[Piece], request_id: str) -> Iterator[str]:
    chunks = openai.Chunks(parsed, request_id)
    try:
        with contextlib.closing(events):  # a caller that goes away, even before the first chunk, cancels its rows
            for piece in events:
                if sent := chunks.piece(piece):
                    yield sent
            yield chunks.end()
    except ScoringError as exc:
        yield openai.render_stream_error(exc)


def _models(scorer: Scorer | None) -> flask.Response:
    if scorer is None:
        error = ModelNotReady("the model is still loading; try again shortly", retry_after=30)
        return _json(openai.error_body(error), error.status, error.headers())
    return _json(openai.models(scorer.max_total_tokens))


def _metrics(scorer: Scorer | None) -> flask.Response:
    if scorer is None:
        return _json(openai.error_body(ModelNotReady("the model is still loading")), 503)
    return flask.Response(scorer.metrics.exposition(), content_type=CONTENT_TYPE)


def _health(scorer: Scorer | None) -> flask.Response:
    """200 with no body while the engine can serve, as vLLM's; 503 with Retry-After while the model loads, or
    once the engine died or stalled (the worker is on its way out)."""
    error = ModelNotReady("the model is still loading", retry_after=30) if scorer is None else scorer.health()
    if error is None:
        return flask.Response(status=200)
    return _json(openai.error_body(error), error.status, error.headers())


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    return flask.Response(flask.json.dumps(body), status=status, headers=headers, mimetype="application/json")
