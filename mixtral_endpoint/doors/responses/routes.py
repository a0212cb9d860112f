"""The OpenAI Responses routes, on azmlinfsrv's own blueprint beside the chat door's (doors/openai/routes.py):
`POST /v1/responses`, streamed or not, through the same core; and, since nothing is stored, a 404 saying why
for the routes that read a stored response back.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import flask

from mixtral_endpoint.doors.openai import protocol as openai
from mixtral_endpoint.doors.openai.routes import SSE_HEADERS
from mixtral_endpoint.doors.responses import protocol as responses
from mixtral_endpoint.protocol.errors import ModelNotReady, ScoringError, as_scoring_error
from mixtral_endpoint.protocol.request import Piece
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger(__name__)

PREFIXES = ("/v1/responses", "/responses")


def register(blueprint: flask.Blueprint, scorer: Callable[[], Scorer | None]) -> None:
    """Adds the routes to azmlinfsrv's blueprint; `scorer` gives the loaded core (None before init)."""
    for prefix in PREFIXES:
        name = prefix.strip("/").replace("/", "_")
        blueprint.add_url_rule(prefix, f"openai_{name}", lambda: _create(scorer()), methods=["POST"])
        for path, methods in (("/<response_id>", ["GET", "DELETE"]), ("/<response_id>/cancel", ["POST"]),
                              ("/<response_id>/input_items", ["GET"])):
            blueprint.add_url_rule(prefix + path, f"openai_{name}_{path.strip('/<>').replace('>/', '_')}",
                                   _not_stored, methods=methods)


def _create(scorer: Scorer | None) -> flask.Response:
    flask.g.api_name = flask.request.path  # azmlinfsrv's access log line
    request_id = flask.g.get("request_id") or uuid.uuid4().hex
    created_at = int(time.time())
    try:
        if scorer is None:
            raise ModelNotReady("the model is still loading; try again shortly", retry_after=30)
        body = scorer.read_json(flask.request.stream, declared_length=flask.request.content_length)
        parsed = responses.parse(body, scorer.config.limits,
                                 extra_parameters=flask.request.headers.get("extra-parameters"))
        if parsed.request.stream:
            events = scorer.stream(parsed.request, request_id)
            return flask.Response(_events(parsed, events, request_id, created_at), mimetype="text/event-stream",
                                  headers=SSE_HEADERS)
        (completion,) = scorer.complete(parsed.request, request_id)
        return _json(responses.render(parsed, completion, request_id, created_at))
    except Exception as exc:  # the caller gets a typed error in OpenAI's shape, never a traceback
        error = as_scoring_error(exc, log)
        return _json(openai.error_body(error), error.status, error.headers())


def _events(parsed: responses.ResponsesRequest, events: Iterator[Piece], request_id: str,
            created_at: int) -> Iterator[str]:
    stream = responses.Events(parsed, request_id, created_at)
    try:
        with contextlib.closing(events):  # a caller that goes away, even before the first event, cancels its row
            yield stream.start()
            calls = openai.CallBuffer(parsed)  # type: ignore[arg-type]  # it reads only `tools`, which both have
            for piece in events:
                if piece.text and not calls.holds(piece.text):
                    yield stream.text(piece.text)
                if piece.completion is not None:
                    yield stream.end(piece.completion, held=calls.held)
    except ScoringError as exc:
        yield stream.error(exc)


def _not_stored(response_id: str) -> flask.Response:
    flask.g.api_name = flask.request.path
    error = responses.not_stored(response_id)
    return _json(openai.error_body(error), error.status)


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    return flask.Response(flask.json.dumps(body), status=status, headers=headers, mimetype="application/json")
