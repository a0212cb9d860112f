"""The one core every door calls: a request payload in, a response body (or event stream) out,
or a typed error."""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .checkpoint import inspect_checkpoint
from .config import ServerConfig
from .engine import Engine, Row, StopCheck
from .errors import ContextLengthExceeded, InternalError, InvalidRequest, PayloadTooLarge
from .placement import plan_placement
from .protocol import (
    Completion,
    ScoringRequest,
    parse_json,
    parse_request,
    render,
    render_stream_delta,
    render_stream_end,
    render_stream_error,
)
from .scheduler import Scheduler
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

Body = dict[str, Any] | list[dict[str, Any]]
_GRACE_S = 30.0  # past a row's deadline, a wait this much longer means the scheduler is stuck


class Scorer:
    def __init__(self, scheduler: Scheduler, tokenizer: PromptTokenizer, config: ServerConfig) -> None:
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.tokenizer = tokenizer
        self.config = config
        window = self.engine.context_window
        self.max_total_tokens = min(config.max_total_tokens, window) if config.max_total_tokens else window

    @classmethod
    def load(cls, checkpoint_dir: Path, config: ServerConfig) -> Scorer:
        checkpoint = inspect_checkpoint(checkpoint_dir)
        tokenizer = PromptTokenizer(checkpoint_dir / "tokenizer.model")
        tokens = min(config.max_total_tokens or checkpoint.context_window, checkpoint.context_window)
        plan = plan_placement(checkpoint, config, rows=config.max_batch_size, tokens=tokens)
        scheduler = Scheduler(lambda: Engine.load(checkpoint, plan, offload_folder=config.offload_folder or None),
                              max_batch=config.max_batch_size, max_queue=config.max_queue)
        return cls(scheduler, tokenizer, config)

    def score_body(self, body: BinaryIO, *, declared_length: int | None = None,
                   request_id: str | None = None) -> Body | Iterator[str]:
        """Scores a request body as /score receives it: size cap, then JSON, then the request; may stream.

        A body whose declared length is over the cap is refused before a byte of it is read, and
        none is read past the cap whatever it declares (a chunked body declares nothing).
        """
        limit = self.config.max_body_bytes
        if declared_length is not None and declared_length > limit:
            raise _too_large(f"{declared_length} bytes", limit)
        data = body.read(limit + 1)
        if len(data) > limit:
            raise _too_large(f"over {limit} bytes", limit)
        return self.score(parse_json(data), request_id=request_id, stream_ok=True)

    def score(self, payload: Any, *, request_id: str | None = None, stream_ok: bool = False) -> Body | Iterator[str]:
        """The response body, or, for `stream: true` where the door can stream, server-sent events.

        Validation and admission happen before this returns, so a stream never starts with an error.
        """
        request = parse_request(payload, self.config.limits)
        if request.stream and not stream_ok:
            raise InvalidRequest("stream is served by the /score endpoint only", param="parameters.stream")
        request_id = request_id or uuid.uuid4().hex
        prompts = self._encode(request)
        rows = self._submit(request, prompts, stream=request.stream)
        if request.stream:
            return self._events(request_id, request, prompts[0], rows[0])
        for row in rows:
            self._wait(request_id, row)
        completions = [self._complete(request, p, row.tokens, row.finish_reason)
                       for p, row in zip(prompts, rows, strict=True)]
        self._log(request_id, request, rows)
        return render(request, completions)

    def _encode(self, request: ScoringRequest) -> list[list[int]]:
        if request.conversation is not None:
            prompts = [self.tokenizer.encode_chat(request.conversation)]
        else:
            assert request.prompts is not None
            prompts = [self.tokenizer.encode_text(p) for p in request.prompts]
        wanted = request.settings.max_new_tokens
        for i, ids in enumerate(prompts):
            if len(ids) + wanted > self.max_total_tokens:
                raise ContextLengthExceeded(
                    f"the prompt is {len(ids)} tokens and max_new_tokens is {wanted}: {len(ids) + wanted} "
                    f"tokens, over the context window of {self.max_total_tokens}",
                    param="input_data.input_string" + ("" if request.is_chat else f"[{i}]"),
                )
        return prompts

    def _submit(self, request: ScoringRequest, prompts: list[list[int]], *, stream: bool) -> list[Row]:
        deadline = time.monotonic() + self.config.request_timeout_s
        stop_check = self._stop_check(request)
        rows = [Row(p, request.settings, stop_check, deadline, queue.SimpleQueue() if stream else None)
                for p in prompts]
        self.scheduler.submit(rows)
        return rows

    def _wait(self, request_id: str, row: Row) -> None:
        if not row.done.wait(self.config.request_timeout_s + _GRACE_S) or row.error is not None:
            log.error("request %s: generation failed or stalled", request_id, exc_info=row.error)
            raise InternalError("generation failed; the server log has the details")

    def _events(self, request_id: str, request: ScoringRequest, prompt: list[int], row: Row) -> Iterator[str]:
        assert row.stream is not None
        # Hold back text that could still turn out to be the start of a stop string.
        hold = max((len(s) for s in request.stop), default=1) - 1
        tokens: list[int] = []
        sent = 0
        try:
            while (token := row.stream.get(timeout=self.config.request_timeout_s + _GRACE_S)) is not None:
                tokens.append(token)
                text = self._text(request, prompt, tokens)
                cut = _find_stop(text, request.stop)
                # \ufffd at the end: a character whose bytes have not all arrived yet.
                safe = cut if cut >= 0 else len(text) - hold - (1 if text.endswith("\ufffd") else 0)
                if safe > sent:
                    yield render_stream_delta(text[sent:safe])
                    sent = safe
            if row.error is not None:
                raise InternalError("generation failed") from row.error
            completion = self._complete(request, prompt, tokens, row.finish_reason)
            if len(completion.text) > sent:
                yield render_stream_delta(completion.text[sent:])
            self._log(request_id, request, [row])
            yield render_stream_end(request, completion)
        except (queue.Empty, InternalError) as exc:
            log.error("request %s: stream failed", request_id, exc_info=exc)
            yield render_stream_error(InternalError("generation failed; the server log has the details").body())
        finally:
            row.cancelled = True  # a caller that went away stops its row at the next step

    def _stop_check(self, request: ScoringRequest) -> StopCheck | None:
        stops = request.stop
        if not stops:
            return None
        # A stop string of n characters spans at most 4n tokens (byte-fallback pieces are 1/4 char).
        window = 4 * max(len(s) for s in stops) + 4
        decode = self.tokenizer.decode
        return lambda ids: any(s in decode(ids[-window:]) for s in stops)

    def _text(self, request: ScoringRequest, prompt: Sequence[int], tokens: Sequence[int]) -> str:
        if request.is_chat:
            return self.tokenizer.decode(tokens)
        return self.tokenizer.decode_continuation(prompt, tokens)

    def _complete(self, request: ScoringRequest, prompt: Sequence[int], tokens: Sequence[int],
                  finish_reason: str | None) -> Completion:
        assert finish_reason in ("stop", "length", "time_limit"), finish_reason
        text = self._text(request, prompt, tokens)
        cut = _find_stop(text, request.stop)
        if cut >= 0:
            text, finish_reason = text[:cut], "stop"
        return Completion(text=text, prompt_token_ids=tuple(prompt), token_ids=tuple(tokens),
                          finish_reason=finish_reason)

    def _log(self, request_id: str, request: ScoringRequest, rows: Sequence[Row]) -> None:
        submitted = min(r.submitted_at for r in rows)
        started = max(r.started_at or submitted for r in rows)
        first = min(r.first_token_at or started for r in rows)
        seconds = time.monotonic() - submitted
        new_tokens = sum(len(r.tokens) for r in rows)
        extra = f" prompt={request.conversation or request.prompts!r}" if self.config.log_prompts else ""
        log.info(
            "request=%s prompts=%d prompt_tokens=%d completion_tokens=%d queue_wait_s=%.3f ttft_s=%.3f "
            "seconds=%.3f tokens_per_s=%.1f batch=%d finish=%s%s",
            request_id, len(rows), sum(len(r.prompt) for r in rows), new_tokens, started - submitted,
            first - submitted, seconds, new_tokens / seconds if seconds > 0 else 0.0, max(r.peak_batch for r in rows),
            ",".join(str(r.finish_reason) for r in rows), extra,
        )


def _too_large(size: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is {size}; at most {limit} bytes are allowed")


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
