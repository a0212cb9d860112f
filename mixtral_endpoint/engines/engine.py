"""The one interface between the core and whatever generates, and what both engines share.

An engine takes rows (a prompt's token ids, frozen SamplingSettings, a deadline) and generates
for them concurrently. A Row is also the caller's handle: the engine sends each new token id to
the row's sink as it comes, ends the row with a finish reason (or an error), and stops a row that
the caller cancelled at its next step. Engines know no text: stop strings, the bounded queue and
rendering stay in the core, so both engines answer the same API the same way.

Two engines implement it: `TransformersEngine` (our continuous batching on transformers: the
reference, and the CPU default) and `VllmEngine` (vLLM, for GPUs); `choice.py` chooses one.

An engine that dies (an error out of its loop, a fault that persists, or a step that has not returned
within its stall limit) fails every row in flight and calls `on_death`; it never serves again. What to
do about it (end the worker) is the door's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from mixtral_endpoint.protocol.errors import ModelNotReady
from mixtral_endpoint.protocol.sampling import Generation, SamplingSettings, TokenLogprob

log = logging.getLogger(__name__)

# Sinks receive (row, token id) for each new token, then (row, None) once the row has ended.
Sink = queue.SimpleQueue


@dataclass(eq=False)
class Row:
    """One prompt in flight, and the caller's handle on it."""

    prompt: list[int]
    settings: SamplingSettings
    deadline: float | None = None  # time.monotonic() after which the row ends with "time_limit"
    sink: Sink | None = None
    # Each token to the sink (streams and stop strings need them as they come), or only the end: a
    # caller thread woken per token competes with the engine thread for the GIL (measured: batch
    # scoring with 24 callers ran at 0.47x the throughput of waking them once per row).
    each_token: bool = True
    on_end: Callable[[Row], None] | None = None  # the core's admission count, released once
    # settings.constraint in the engine's grammar_form: compiled for our engine's vocabulary (an xgrammar
    # CompiledGrammar, from the core's cache), or on vLLM its EBNF text. Our engine keeps the row's matcher
    # of it in `matcher`.
    grammar: Any = None
    matcher: Any = None
    tokens: list[int] = field(default_factory=list)  # written by the engine thread only
    # With settings.logprobs: one entry per token, written before the token is emitted; with
    # settings.prompt_logprobs: one per prompt token (None for the first), written before the first token.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None  # stop | length | time_limit | cancelled | error
    error: BaseException | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)  # when the caller asked: its wait in the line counts
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    peak_batch: int = 0  # the most rows this one was generated together with (itself included)
    done: threading.Event = field(default_factory=threading.Event)
    _ending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self) -> None:
        """Stops the row at the engine's next step; a no-op once it has ended."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    # The engine's side.
    def emit(self, token: int, now: float, batch: int, logprob: TokenLogprob | None = None) -> None:
        if logprob is not None:
            self.logprobs.append(logprob)
        self.tokens.append(token)
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.peak_batch = max(self.peak_batch, batch)
        if self.sink is not None and self.each_token:
            self.sink.put((self, token))

    def finish(self, reason: str) -> None:
        self._end(reason, None)

    def fail(self, error: BaseException) -> None:
        self._end("error", error)

    def _end(self, reason: str, error: BaseException | None) -> None:
        """Ends the row once, whichever threads race to end it (the engine's, a caller cancelling, a close)."""
        with self._ending:
            if self.done.is_set():
                return
            self.error = error
            self.finish_reason = reason
            self.done.set()
        if self.on_end is not None:
            self.on_end(self)
        if self.sink is not None:
            self.sink.put((self, None))

    @property
    def generation(self) -> Generation:
        assert self.finish_reason is not None
        return Generation(tuple(self.tokens), self.finish_reason)


# Retry-After for a request that reaches an engine that has died: a fresh worker loads the model
# (seconds for the embedded model, a few minutes for Mixtral-8x7B).
RETRY_AFTER_DEATH_S = 30
# Errors after which a device serves nothing more until the process ends.
_DEVICE_LOST = ("illegal memory access", "device-side assert", "unspecified launch failure", "ECC error",
                "device lost", "CUDA error: misaligned address")


@dataclass(frozen=True)
class Capacity:
    """What an engine holds at once: the core's line hands it rows while both limits allow."""

    rows: int  # rows stepped together (our batch; vLLM's max_num_seqs)
    # vLLM's paged KV cache, in tokens: a row takes its prompt + max_new_tokens, in whole blocks. None: our
    # engine, whose rows x context cache holds any row that fits the context.
    kv_tokens: int | None = None
    block_tokens: int = 1

    def cost(self, row: Row) -> int:
        """The cache tokens `row` may come to hold: its prompt and every token it may generate."""
        if self.kv_tokens is None:
            return 0
        tokens = len(row.prompt) + row.settings.max_new_tokens
        return -(-tokens // self.block_tokens) * self.block_tokens


class Engine(Protocol):
    name: str
    # How a Row carries its constraint's grammar: compiled by the core (xgrammar, for our matcher), or its
    # EBNF text, which the engine compiles itself (vLLM's structured outputs).
    grammar_form: Literal["compiled", "ebnf"]
    context_window: int  # prompt + new tokens of one row, at most
    eos_id: int
    capacity: Capacity
    # Each load's, called if the engine dies: on the engine thread, or on its watchdog's after a stall.
    on_death: list[Callable[[BaseException], None]]

    @property
    def dead(self) -> BaseException | None:
        """What killed the engine, or None while it serves."""

    @property
    def row_counts(self) -> tuple[int, int]:
        """(rows generating, rows waiting for a place)."""

    def submit(self, rows: Sequence[Row]) -> None:
        """Starts generating for `rows`; they end through Row.finish or Row.fail, never silently.
        Raises ModelNotReady once the engine has died or is closing."""

    def watch(self, stall_limit_s: float) -> None:
        """From now on, a step that has not returned within `stall_limit_s` is the engine's death."""

    def close(self) -> None:
        """Ends every row still in flight (cancelled), stops the engine thread and frees the model."""


class EngineStalled(RuntimeError):
    """A step that has not returned within the stall limit (a hung device, a collective waiting on a dead peer)."""


def device_lost(error: BaseException) -> bool:
    """An error after which the device runs nothing more in this process (CUDA's "illegal memory
    access" poisons the context until the process ends): the engine's death, not one batch's."""
    import torch

    return isinstance(error, torch.AcceleratorError) or any(m in str(error) for m in _DEVICE_LOST)


class EngineThread:
    """What both engines share: one thread that loads the model and runs every step (on CPU, torch
    runs up to 1.5x slower in a thread other than the one that first used its OpenMP pool), an
    inbox of submitted rows, a clean close, a death that fails every row and calls `on_death`, and a
    watchdog that makes a step stalled past the limit that death (a blocked thread cannot be stopped,
    nor its model freed: the worker's exit ends both)."""

    name: str
    close_timeout_s = 60.0  # a step longer than this is stuck: close leaves the model to the thread

    def __init__(self, load: Callable[[], None], *, thread_name: str) -> None:
        """Starts the thread, which calls `load`; returns once it has (raising what it raised)."""
        self.on_death: list[Callable[[BaseException], None]] = []  # every load sharing the engine adds its own
        self._inbox: collections.deque[Row] = collections.deque()
        self._wake = threading.Condition()  # guards the inbox and the flags below
        self._closing = False
        self._dead: BaseException | None = None
        self._step_started_at: float | None = None  # time.monotonic() while a step runs; read by the watchdog
        self.stall_limit_s: float | None = None  # set by watch()
        self._watchdog: threading.Thread | None = None
        self._unwatched = threading.Event()  # set once closing or dead: the watchdog ends
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name=thread_name, daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    def submit(self, rows: Sequence[Row]) -> None:
        with self._wake:
            if self._dead is not None:
                raise ModelNotReady("the engine failed and this worker is being replaced; retry shortly",
                                    retry_after=RETRY_AFTER_DEATH_S)
            if self._closing:
                raise ModelNotReady("the server is shutting down; retry shortly", retry_after=2)
            self._inbox.extend(rows)
            self._wake.notify()

    def watch(self, stall_limit_s: float) -> None:
        assert stall_limit_s > 0, stall_limit_s
        with self._wake:
            if self._watchdog is not None:  # loads sharing a vLLM engine: the first load's limit holds
                if stall_limit_s != self.stall_limit_s:
                    log.warning("this engine's steps already stall after %g s; a later load's %g s is not applied",
                                self.stall_limit_s, stall_limit_s)
                return
            self.stall_limit_s = stall_limit_s
            self._watchdog = threading.Thread(target=self._watch, args=(stall_limit_s,),
                                              name=f"{self._thread.name}-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._unwatched.set()
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.close_timeout_s)
            if self._thread.is_alive():
                # Its step still runs: the thread frees the model once that step ends, not before.
                log.error("the %s engine did not stop within %.0f s; it frees its model when its step ends",
                          self.name, self.close_timeout_s)

    def _loop(self) -> None:
        """Runs until `_closing`; an exception out of it is the engine's death. Each step runs under
        `_stepping()`, waits for work outside it."""
        raise NotImplementedError

    def _drop_in_flight(self) -> list[Row]:
        """Forgets the rows the model is working on and returns them."""
        raise NotImplementedError

    def _unload(self) -> None:
        """Drops the model, so its memory goes with the last reference."""
        raise NotImplementedError

    def _run(self, load: Callable[[], None]) -> None:
        try:
            load()
        except BaseException as exc:
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        try:
            self._loop()
        except BaseException as exc:
            self._die(exc)
        else:
            self._end_all(functools.partial(Row.finish, reason="cancelled"))
        finally:
            self._unwatched.set()
            self._unload()  # on this thread, once no step can run: nothing frees the model under one

    @contextlib.contextmanager
    def _stepping(self) -> Iterator[None]:
        """Marks a step (a pass of the model, or a call into vLLM) for the watchdog."""
        self._step_started_at = time.monotonic()
        try:
            yield
        finally:
            self._step_started_at = None

    def _watch(self, limit: float) -> None:
        """Sleeps until the step under way would pass the limit, then looks again: the same step still
        running is a stall. It wakes once per limit at most while steps come and go."""
        while True:
            started, now = self._step_started_at, time.monotonic()
            if started is not None and now - started >= limit:
                # Where the thread is blocked is what an operator needs to tell a hung device from a deadlock.
                frame = sys._current_frames().get(self._thread.ident or -1)
                log.critical("the %s engine's step has run %.1f s, past its stall limit of %g s; its thread is "
                             "blocked in:\n%s", self.name, now - started, limit,
                             "".join(traceback.format_stack(frame)) if frame else "(unknown)")
                self._die(EngineStalled(f"a step of the {self.name} engine has not returned in {now - started:.1f} "
                                        f"s (the stall limit is {limit:g} s)"))
                return
            if self._unwatched.wait(limit if started is None else started + limit - now):
                return

    def _die(self, error: BaseException) -> None:
        """The engine's death, once, whichever thread finds it (the engine's, or the watchdog's while the
        engine's is blocked in a step): later submits are refused, every row fails, each load hears of it."""
        if self._dead is not None:
            return
        log.critical("the %s engine died", self.name, exc_info=error)  # before `dead` shows, as on_death runs
        with self._wake:
            if self._dead is not None:  # the other thread got there first
                return
            self._dead = error
            self._closing = True  # a blocked step that returns after all ends the loop
            self._wake.notify()
        self._unwatched.set()
        self._end_all(functools.partial(Row.fail, error=error))
        for on_death in self.on_death:
            on_death(error)

    def _end_all(self, end: Callable[[Row], None]) -> None:
        with self._wake:
            rows = [*self._drop_in_flight(), *self._inbox]
            self._inbox.clear()
        for row in rows:
            end(row)
