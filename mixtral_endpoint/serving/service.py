"""The one core every door calls: a parsed request in, its completions (or a stream of its text) out,
or a typed error.

Everything between the doors and the engine interface lives here, so both engines and every door answer
alike: tokenization, compiled grammars (engines/grammar.py), the bounded line (line.py), deadlines, stop strings,
content screening and the guardrail prompt (safety.py), data collection (collector.py), metrics and the
per-request log line. Each door parses its own API into a ScoringRequest and renders the Completions
(doors/score.py for /score, MLflow and batch jobs; doors/openai/ for the OpenAI routes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import re
import time
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from mixtral_endpoint.engines.choice import load_engine
from mixtral_endpoint.engines.engine import RETRY_AFTER_DEATH_S, Engine, Row
from mixtral_endpoint.engines.grammar import Grammars, ebnf
from mixtral_endpoint.model.checkpoint import inspect_checkpoint
from mixtral_endpoint.model.tokenizer import PromptTokenizer
from mixtral_endpoint.protocol.config import DEADLINE_GRACE_S, MODEL_NAME, ServerConfig
from mixtral_endpoint.protocol.constraints import Constraint
from mixtral_endpoint.protocol.errors import (
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    ModelNotReady,
    PayloadTooLarge,
    ScoringError,
)
from mixtral_endpoint.protocol.parameters import BY_NAME
from mixtral_endpoint.protocol.request import Completion, Logprob, Piece, ScoringRequest
from mixtral_endpoint.protocol.sampling import SamplingSettings, TokenLogprob
from mixtral_endpoint.protocol.validation import parse_json
from mixtral_endpoint.serving.collector import DataCollector
from mixtral_endpoint.serving.detokenizer import Detokenizer
from mixtral_endpoint.serving.line import RETRY_AFTER_S, Line, line_for
from mixtral_endpoint.serving.metrics import Metrics
from mixtral_endpoint.serving.safety import CHUNK_CHARS, STREAM_WINDOW_CHARS, Screen, with_guardrail

log = logging.getLogger(__name__)

_PLAIN_ID = re.compile(r"[\w.:/+-]{1,200}", re.ASCII)
_CONTEXT_TOKENS = 8  # prompt tokens decoded before a completion, so its leading space survives


class Stream(Iterator[Piece]):
    """A stream's pieces, each answer's in order (answers interleave as the engine makes them), each answer's
    last one with its Completion. Closing it cancels its rows, even before the first piece was asked for (a
    generator closed before it started would run none of its clean-up)."""

    def __init__(self, pieces: Generator[Piece, None, None], rows: list[Row], line: Line) -> None:
        self._pieces = pieces
        self.rows = rows
        self.row = rows[0]
        self._line = line

    def __next__(self) -> Piece:
        return next(self._pieces)

    def close(self) -> None:
        self._line.cancel(self.rows)
        self._pieces.close()


class Scorer:
    def __init__(self, engine: Engine, tokenizer: PromptTokenizer, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.line = line_for(engine, config.max_queue)
        self.grammars = Grammars(tokenizer) if engine.grammar_form == "compiled" else None
        self.collector = DataCollector() if config.data_collection else None
        self.screen = None if not config.content_safety_endpoint else Screen(
            config.content_safety_endpoint, threshold=config.content_safety_threshold,
            fail_open=config.content_safety_fail_open, key=config.content_safety_key)
        # Closes the engine once: on close(), when the scorer is collected (a notebook or MLflow
        # loading the model again frees the last copy) or at interpreter exit, before torch is torn
        # down under the engine thread. It holds the engine, never the scorer; the children's closers likewise.
        self._close = weakref.finalize(self, engine.close)
        self._close_screen = weakref.finalize(self, self.screen.close) if self.screen is not None else None
        self._close_collector = weakref.finalize(self, self.collector.close) if self.collector is not None else None
        # The engine's window: the model's context, or on vLLM at most what its KV cache holds.
        window = engine.context_window
        self.max_total_tokens = min(config.max_total_tokens, window) if config.max_total_tokens else window
        assert (engine.capacity.kv_tokens or window) >= window, "a row of the whole window must fit the cache"
        self.metrics = Metrics(self.line, model_name=MODEL_NAME, max_model_len=self.max_total_tokens)

    @classmethod
    def load(cls, checkpoint_dir: Path, config: ServerConfig) -> Scorer:
        checkpoint = inspect_checkpoint(checkpoint_dir)
        tokenizer = PromptTokenizer(checkpoint_dir / "tokenizer.model")
        return cls(load_engine(checkpoint, config), tokenizer, config)

    def close(self) -> None:
        """Closes the engine and the screening and collecting processes, once (a door's shutdown and
        interpreter exit may both ask)."""
        for close in (self._close, self._close_screen, self._close_collector):
            if close is not None:
                close()

    def health(self) -> ModelNotReady | None:
        """None while the engine can serve; else why not. A stalled engine is a dead one (engine.py)."""
        if self.engine.dead is not None:
            return ModelNotReady("the engine died or stalled and this worker is being replaced; retry shortly",
                                 retry_after=RETRY_AFTER_DEATH_S)
        return None

    def read_json(self, body: BinaryIO, *, declared_length: int | None = None) -> Any:
        """A request body as a door receives it: the size cap, then JSON. A body whose declared length
        is over the cap is refused before a byte of it is read, and none is read past the cap
        whatever it declares (a chunked body declares nothing)."""
        limit = self.config.max_body_bytes
        if declared_length is not None and declared_length > limit:
            raise _too_large(f"{declared_length} bytes", limit)
        data = body.read(limit + 1)
        if len(data) > limit:
            raise _too_large(f"over {limit} bytes", limit)
        return parse_json(data)

    def complete(self, request: ScoringRequest, request_id: str) -> list[Completion]:
        """Generates for every prompt of a validated request and waits for all."""
        rows, texts, sink = self._admit(request)
        for _ in self._follow(request_id, rows, texts, sink, {id(row) for row in rows}):
            pass
        prompt_texts = self._prompt_texts(request)
        completions = [self._complete(row, text, prompt_text)
                       for row, text, prompt_text in zip(rows, texts, prompt_texts, strict=True)]
        if self.screen is not None:
            verdicts = [self.screen.start(c.text) for c in completions]  # all at once: one round trip
            completions = [_withheld(c, "") if v.answer_flagged() else c
                           for c, v in zip(completions, verdicts, strict=True)]
        self._log(request_id, request, rows, completions)
        return completions

    def stream(self, request: ScoringRequest, request_id: str) -> Stream:
        """Each answer's new text as it is generated (with its tokens' log-probabilities where asked), its last
        piece with its Completion; a failure midway raises a ScoringError.

        Validation, screening of the prompt and admission happen before this returns, so a stream never
        starts with an error.
        """
        rows, texts, sink = self._admit(request)
        return Stream(self._stream(request_id, request, rows, texts, sink), rows, self.line)

    def _admit(self, request: ScoringRequest) -> tuple[list[Row], list[Detokenizer], queue.SimpleQueue]:
        """The request's rows in the line, its prompts screened. The prompts are screened once admitted (a
        request the line refuses sends nothing to screening, so a retry never screens twice) and while the
        engine already works on them (the round trip is not added to the time to first token, nor does it
        hold a place in the batch empty); nothing of a row reaches the caller before its prompt passed, and
        a flagged prompt's rows are cancelled."""
        rows, texts, sink = self._submit(request, self._encode(request))
        try:
            if self.screen is not None:
                verdicts = [self.screen.start_prompt(text) for text in _screened_prompts(request, self.tokenizer)]
                for verdict in verdicts:
                    verdict.check_prompt(param=request.fields.input)
        except BaseException as exc:
            self.line.cancel(rows)
            if isinstance(exc, ScoringError) and exc.status in (429, 503):  # screening's backlog, or its failure
                self.metrics.refused(exc)
            raise
        return rows, texts, sink

    def encode(self, request: ScoringRequest) -> list[list[int]]:
        """The prompts' token ids, exactly as generation takes them: with the guardrail prompt where the request
        or the server asks."""
        if request.conversation is not None:
            safe = self.config.safe_prompt if request.safe_prompt is None else request.safe_prompt
            conversation = with_guardrail(request.conversation) if safe else request.conversation
            return [self.tokenizer.encode_chat(conversation, param=request.fields.input)]
        assert request.prompts is not None
        return [list(p) if isinstance(p, tuple) else self.tokenizer.encode_text(p) for p in request.prompts]

    def _encode(self, request: ScoringRequest) -> list[list[int]]:
        """The prompts' token ids, each checked against the context window with max_new_tokens; and the token
        ids the settings name, against the vocabulary."""
        vocab, settings = self.tokenizer.vocab_size, request.settings
        for name, ids in (("logit_bias", [token for token, _ in settings.logit_bias]),
                          ("stop_token_ids", settings.stop_token_ids)):
            if any(token >= vocab for token in ids):
                raise InvalidRequest(f"{request.fields.parameter(name)} names token {max(ids)}; the vocabulary's ids "
                                     f"are 0 to {vocab - 1}", param=request.fields.parameter(name))
        prompts = self.encode(request)
        for i, ids in enumerate(prompts):
            if not request.is_chat and isinstance(request.prompts[i], tuple) and max(ids) >= vocab:
                j = next(j for j, token in enumerate(ids) if token >= vocab)
                raise InvalidRequest(f"{request.fields.prompt(i)}[{j}] is {ids[j]}; the vocabulary's ids are 0 to "
                                     f"{vocab - 1}", param=f"{request.fields.prompt(i)}[{j}]")
        wanted = request.settings.max_new_tokens
        for i, ids in enumerate(prompts):
            if len(ids) + wanted > self.max_total_tokens:
                raise ContextLengthExceeded(
                    f"the prompt is {len(ids)} tokens and max_new_tokens is {wanted}: {len(ids) + wanted} "
                    f"tokens, over the context window of {self.max_total_tokens}",
                    param=request.fields.input if request.is_chat else request.fields.prompt(i),
                )
        return prompts

    def _submit(self, request: ScoringRequest, prompts: list[list[int]]
                ) -> tuple[list[Row], list[Detokenizer], queue.SimpleQueue]:
        grammar = self._grammar(request.settings.constraint)
        deadline = time.monotonic() + self.config.request_timeout_s
        sink: queue.SimpleQueue = queue.SimpleQueue()  # every row of the request reports here
        prompts = [p for p in prompts for _ in range(request.n)]  # each prompt's n answers together
        rows = [Row(p, _answer_settings(request.settings, i % request.n), deadline, sink,
                    each_token=request.stream or bool(request.stop), grammar=grammar) for i, p in enumerate(prompts)]
        marks = request.stream and request.settings.logprobs is not None
        texts = [Detokenizer(self.tokenizer.decode, eos_id=self.tokenizer.eos_id, stops=request.stop,
                             context=() if request.is_chat else p[-_CONTEXT_TOKENS:], marks=marks)
                 for p in prompts]
        try:
            self.line.take(rows)
        except BaseException as exc:
            for row in rows:
                row.finish("error")  # gives their places in the line back
            if isinstance(exc, ScoringError):  # the line full, or the engine dead or closing
                self.metrics.refused(exc)
            raise
        return rows, texts, sink

    def _grammar(self, constraint: Constraint | None) -> object | None:
        """The constraint checked, before admission, and in the form the engine takes: compiled (once, kept in
        a bounded cache) for ours; EBNF text for vLLM, which compiles and caches it itself. On this request's
        thread, never the engine's."""
        if constraint is None:
            return None
        try:
            return self.grammars.compile(constraint) if self.grammars is not None else ebnf(constraint)
        except ValueError as exc:
            raise InvalidRequest(f"{constraint.param or 'the constraint'} cannot be compiled into a grammar: {exc}",
                                 param=constraint.param or None) from None

    def _follow(self, request_id: str, rows: list[Row], texts: list[Detokenizer], sink: queue.SimpleQueue,
                open_rows: set[int]) -> Iterator[tuple[int, str, bool]]:
        """Reads the rows' tokens as they come until every row of `open_rows` (their ids) has ended; yields each
        row's new safe text as (its index, the text, whether the row has ended). A row that hits a stop string
        is cancelled in the engine; one the caller takes out of `open_rows` (and cancels) is no longer read."""
        index_of = {id(row): i for i, row in enumerate(rows)}
        expiry = min(row.deadline or math.inf for row in rows)  # rows still waiting in the line end then
        deadline = max(row.deadline or 0.0 for row in rows) + DEADLINE_GRACE_S
        try:
            while open_rows:
                try:
                    row, token = sink.get(timeout=max(min(expiry, deadline) - time.monotonic(), 0.0))
                except queue.Empty:
                    if expiry < deadline:
                        self.line.expire(rows, time.monotonic())
                        expiry = math.inf
                        continue
                    log.error("request %s: the engine stalled", _logged(request_id))
                    raise InternalError("generation stalled; the server log has the details") from None
                if id(row) not in open_rows:
                    continue  # tokens the engine made before it saw our cancel
                i = index_of[id(row)]
                text = texts[i]
                if token is None:
                    if isinstance(row.error, ScoringError):  # the engine died before it took the row
                        raise row.error
                    if row.error is not None:
                        log.error("request %s: generation failed", _logged(request_id), exc_info=row.error)
                        raise InternalError("generation failed; the server log has the details")
                    if row.finish_reason == "cancelled":
                        raise ModelNotReady("the server is shutting down; retry shortly", retry_after=RETRY_AFTER_S)
                    if not row.each_token:
                        text.extend(row.tokens)  # final: the engine is done with the row
                    text.flush()
                    open_rows.discard(id(row))
                else:
                    text.add(token)
                    if text.stopped:
                        self.line.cancel([row])
                        open_rows.discard(id(row))
                ended = id(row) not in open_rows
                yield i, text.take(final=ended), ended
        except ScoringError as exc:
            if exc.status >= 500:  # vLLM's finished_reason "error": every row of a request the server failed
                self.metrics.record(rows, [len(r.tokens) for r in rows], ["error"] * len(rows), time.monotonic())
            raise
        finally:
            self.line.cancel(rows)  # a caller that went away, or a failed neighbour: stop at the next step

    def _stream(self, request_id: str, request: ScoringRequest, rows: list[Row], texts: list[Detokenizer],
                sink: queue.SimpleQueue) -> Iterator[Piece]:
        # Per token, a row that asked for no log-probabilities costs one tuple here: the ceiling benchmark feels more.
        open_rows = {id(row) for row in rows}
        completions: list[Completion | None] = [None] * len(rows)
        left = len(rows)
        asked = request.settings.logprobs is not None
        sent = [0] * len(rows)  # with log-probabilities: each row's tokens gone out
        prompt_texts = self._prompt_texts(request)
        unstarted = [not request.is_chat or request.settings.prompt_logprobs is not None] * len(rows)
        screened = [_Screened() for _ in rows] if self.screen is not None else None

        def piece(i: int, text: str, logprobs: tuple[Logprob, ...] | None, completion: Completion | None) -> Piece:
            nonlocal left
            if completion is not None:
                completions[i], left = completion, left - 1
                if not left:
                    self._log(request_id, request, rows, completions)  # type: ignore[arg-type]  # all set
            if not unstarted[i]:
                return Piece(i, text, logprobs, completion)
            unstarted[i] = False  # an answer's first piece: its prompt, for a door that echoes it
            return Piece(i, text, logprobs, completion, prompt_texts[i], self._prompt_logprobs(rows[i]))

        try:
            with contextlib.closing(self._follow(request_id, rows, texts, sink, open_rows)) as events:
                for i, text, ended in events:
                    logprobs = None
                    if asked:
                        released = texts[i].released
                        logprobs, sent[i] = self._logprobs(rows[i], texts[i].tokens, sent[i], released), released
                    if screened is None:
                        if ended or unstarted[i]:
                            yield piece(i, text, logprobs, self._complete(rows[i], texts[i], prompt_texts[i])
                                        if ended else None)
                        else:  # every token but an answer's first and last: _make skips Piece.__new__'s defaults
                            yield Piece._make((i, text, logprobs, None, None, None))
                        continue
                    state = screened[i]
                    state.held += text
                    state.logprobs += logprobs or ()
                    if ended:
                        completion = self._complete(rows[i], texts[i], prompt_texts[i])
                        if state.held and self.screen.start(state.held).answer_flagged():
                            yield piece(i, "", () if asked else None, _withheld(completion, state.released))
                        else:
                            yield piece(i, state.held, tuple(state.logprobs) if asked else None, completion)
                    elif len(state.held) >= state.window:
                        if self.screen.start(state.held).answer_flagged():
                            self.line.cancel([rows[i]])
                            open_rows.discard(id(rows[i]))
                            yield piece(i, "", () if asked else None, self._flagged(rows[i], state.released,
                                                                                   prompt_texts[i], asked))
                            continue
                        yield piece(i, *state.release(asked), None)
        except GeneratorExit:  # the caller went away; _follow has cancelled the rows
            if left:
                deadline = time.monotonic() + DEADLINE_GRACE_S
                for row in rows:
                    row.done.wait(timeout=max(deadline - time.monotonic(), 0.0))
                log.info("request=%s engine=%s cancelled: the caller went away; generation stopped after %d tokens "
                         "(max_new_tokens %d)", _logged(request_id), self.engine.name, sum(len(r.tokens) for r in rows),
                         request.settings.max_new_tokens)
                self.metrics.record(rows, [len(r.tokens) for r in rows],
                                    ["abort" if c is None else c.finish_reason for c in completions], time.monotonic())
            raise

    def _flagged(self, row: Row, released: str, prompt_text: str, asked: bool) -> Completion:
        """A streamed answer that screening flagged midway: the text released before it, no tokens, and no
        log-probabilities (those of the released text have gone out with it)."""
        return Completion(text=released, prompt_token_ids=tuple(row.prompt), token_ids=(),
                          finish_reason="content_filter", prompt_text=prompt_text, logprobs=() if asked else None,
                          prompt_logprobs=self._prompt_logprobs(row))

    def _prompt_texts(self, request: ScoringRequest) -> list[str]:
        """Each row's prompt as text ("" for a conversation): a text prompt as it came, token ids decoded."""
        if request.prompts is None:
            return [""] * request.n
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in request.prompts]
        return [text for text in texts for _ in range(request.n)]

    def _complete(self, row: Row, text: Detokenizer, prompt_text: str) -> Completion:
        finish_reason = "stop" if text.stopped else row.finish_reason
        assert finish_reason in ("stop", "length", "time_limit"), finish_reason
        tokens = tuple(text.tokens)  # a stop string cuts tokens the row made: their log-probabilities go too
        logprobs = None if row.settings.logprobs is None else self._logprobs(row, tokens, 0, len(tokens))
        return Completion(text=text.text, prompt_token_ids=tuple(row.prompt), token_ids=tokens,
                          finish_reason=finish_reason, prompt_text=prompt_text, logprobs=logprobs,
                          prompt_logprobs=self._prompt_logprobs(row))

    def _logprobs(self, row: Row, tokens: Sequence[int], start: int, end: int) -> tuple[Logprob, ...]:
        """The log-probabilities of tokens[start:end], the row's new tokens."""
        return tuple(self._logprob(t, lp) for t, lp in zip(tokens[start:end], row.logprobs[start:end], strict=False))

    def _prompt_logprobs(self, row: Row) -> tuple[Logprob, ...] | None:
        return None if row.prompt_logprobs is None else tuple(
            self._logprob(t, lp) for t, lp in zip(row.prompt, row.prompt_logprobs, strict=True))

    def _logprob(self, token: int, logprob: TokenLogprob | None) -> Logprob:
        text = self.tokenizer.token_bytes
        if logprob is None:
            return Logprob(token, text(token), None)
        return Logprob(token, text(token), logprob.logprob,
                       tuple(Logprob(t, text(t), lp) for t, lp in logprob.top))

    def _log(self, request_id: str, request: ScoringRequest, rows: Sequence[Row],
             completions: Sequence[Completion]) -> None:
        submitted = min(r.submitted_at for r in rows)
        started = max(r.started_at or submitted for r in rows)
        first = min(r.first_token_at or started for r in rows)
        now = time.monotonic()
        seconds = now - submitted
        self.metrics.record(rows, [len(c.token_ids) for c in completions], [c.finish_reason for c in completions],
                            now)
        if self.collector is not None:
            self.collector.collect(request_id, request, completions)
        new_tokens = sum(len(c.token_ids) for c in completions)
        # One line per request, its fields also as the record's attributes: Application Insights' customDimensions.
        fields: dict[str, object] = {
            "request_id": request_id, "engine": self.engine.name, "prompts": len(rows),
            "prompt_tokens": sum(len(r.prompt) for r in rows), "completion_tokens": new_tokens,
            "queue_wait_s": round(started - submitted, 3), "ttft_s": round(first - submitted, 3),
            "seconds": round(seconds, 3), "tokens_per_s": round(new_tokens / seconds if seconds > 0 else 0.0, 1),
            "batch": max(r.peak_batch for r in rows), "finish_reason": ",".join(c.finish_reason for c in completions),
        }
        if self.config.log_prompts:
            fields["prompt"] = repr(request.conversation or request.prompts)
        shown = {**fields, "request_id": _logged(request_id)}
        log.info(" ".join(f"{'request' if k == 'request_id' else k}=%s" for k in shown), *shown.values(), extra=fields)


@dataclass
class _Screened:
    """One streamed answer under screening: its text goes out window by window, each once screened (safety.py),
    its tokens' log-probabilities with it."""

    released: str = ""
    held: str = ""  # the next window, screened once it is full
    logprobs: list[Logprob] = field(default_factory=list)  # the held text's tokens'
    window: int = STREAM_WINDOW_CHARS

    def release(self, asked: bool) -> tuple[str, tuple[Logprob, ...] | None]:
        """The held window, screened and passed, and its log-probabilities; the next window is twice as long."""
        text, logprobs = self.held, tuple(self.logprobs) if asked else None
        self.released, self.held, self.logprobs = self.released + text, "", []
        self.window = min(2 * self.window, CHUNK_CHARS)
        return text, logprobs


def _answer_settings(settings: SamplingSettings, answer: int) -> SamplingSettings:
    """Answer i of a prompt's n: with a seed, seed + i, so each answer is reproducible and none repeats another."""
    if answer == 0 or settings.seed is None:
        return settings
    return replace(settings, seed=(settings.seed + answer) % (BY_NAME["seed"].maximum + 1))


def _logged(request_id: str) -> str:
    """The request id as log lines show it: as it is when plain, else quoted as JSON. It may be the caller's
    x-request-id, which could otherwise forge a field (`finish_reason=...`) or a whole line."""
    return request_id if _PLAIN_ID.fullmatch(request_id) else json.dumps(request_id)


def _screened_prompts(request: ScoringRequest, tokenizer: PromptTokenizer) -> list[str]:
    """What of a request is screened as its prompt: a conversation's messages as one text, or each prompt."""
    if request.conversation is not None:
        return ["\n".join(m.content for m in request.conversation)]
    assert request.prompts is not None
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in request.prompts]


def _withheld(completion: Completion, released: str) -> Completion:
    """A flagged answer: only the text a stream had released (screened windows) stays; no token ids, and no
    log-probabilities (their tokens would spell the withheld text)."""
    return replace(completion, text=released, token_ids=(), finish_reason="content_filter",
                   logprobs=None if completion.logprobs is None else ())


def _too_large(size: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is {size}; at most {limit} bytes are allowed")
