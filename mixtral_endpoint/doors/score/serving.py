"""The /score door: the model card's API (`{"input_data": {...}, "parameters": {...}}`) onto the core.

azmlinfsrv's `/score` (score.py), the MLflow model and batch jobs all speak it: a payload is parsed into the
core's request (protocol.py, beside this), the core generates for it, and the answer is rendered back, as a
body or as server-sent events. The OpenAI door (doors/openai/) does the same for its own API.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mixtral_endpoint.doors.score.protocol import (
    parse_request,
    render,
    render_stream_delta,
    render_stream_end,
    render_stream_error,
)
from mixtral_endpoint.protocol.errors import InvalidRequest, Overloaded, ScoringError
from mixtral_endpoint.protocol.request import Piece, ScoringRequest
from mixtral_endpoint.serving.service import Scorer

Body = dict[str, Any] | list[dict[str, Any]]


def score(scorer: Scorer, payload: Any, *, request_id: str | None = None,
          stream_ok: bool = False) -> Body | Iterator[str]:
    """The answer to a payload: the response body, or, for `stream: true` where the door can stream, an
    iterator of server-sent events."""
    request = parse_request(payload, scorer.config.limits)
    if request.stream and not stream_ok:
        raise InvalidRequest("stream is served by the /score endpoint only", param="parameters.stream")
    request_id = request_id or uuid.uuid4().hex
    if request.stream:
        return _server_sent_events(request, scorer.stream(request, request_id))
    return render(request, scorer.complete(request, request_id))


def score_all(scorer: Scorer, payloads: Sequence[Any]) -> list[Body]:
    """Scores every payload at once, so the engine batches them, and waits for all (MLflow predict, batch
    jobs): a full line is waited out, never refused. The first error raises."""
    workers = min(len(payloads), scorer.line.limit)
    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="score-all") as pool:
        return list(pool.map(lambda payload: score_patiently(scorer, payload), payloads))


def score_patiently(scorer: Scorer, payload: Any) -> Body:
    """`score`, waiting for room in the line instead of raising Overloaded, but not for ever: a line full
    for a whole request deadline means the engine is not moving."""
    deadline = time.monotonic() + scorer.config.request_timeout_s
    while True:
        try:
            return score(scorer, payload)  # type: ignore[return-value]  (no stream without stream_ok)
        except Overloaded:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _server_sent_events(request: ScoringRequest, events: Iterator[Piece]) -> Iterator[str]:
    """/score's stream: text deltas, then finish reason and usage, then [DONE]; a failure midway ends
    it with an error event (the status line has gone out already)."""
    try:
        with contextlib.closing(events):  # a caller that goes away cancels its row
            for piece in events:
                if piece.text:
                    yield render_stream_delta(piece.text)
                if piece.completion is not None:
                    yield render_stream_end(request, piece.completion)
    except ScoringError as exc:
        yield render_stream_error(exc.body())
