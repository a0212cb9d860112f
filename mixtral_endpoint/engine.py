"""The one interface between the core and whatever generates, and the choice of engine.

An engine takes rows (a prompt's token ids, frozen SamplingSettings, a deadline) and generates
for them concurrently. A Row is also the caller's handle: the engine sends each new token id to
the row's sink as it comes, ends the row with a finish reason (or an error), and stops a row that
the caller cancelled at its next step. Engines know no text: stop strings, the bounded queue and
rendering stay in the core, so both engines answer the same API the same way.

Two engines implement it: `TransformersEngine` (our continuous batching on transformers: the
reference, and the CPU default) and `VllmEngine` (vLLM, for GPUs).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .errors import ConfigError, InternalError
from .sampling import Generation, SamplingSettings

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import ServerConfig

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
    tokens: list[int] = field(default_factory=list)  # written by the engine thread only
    finish_reason: str | None = None  # stop | length | time_limit | cancelled | error
    error: BaseException | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    peak_batch: int = 0  # the most rows this one was generated together with (itself included)
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stops the row at the engine's next step; a no-op once it has ended."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    # The engine's side.
    def emit(self, token: int, now: float, batch: int) -> None:
        self.tokens.append(token)
        self.first_token_at = self.first_token_at or now
        self.peak_batch = max(self.peak_batch, batch)
        if self.sink is not None and self.each_token:
            self.sink.put((self, token))

    def finish(self, reason: str) -> None:
        if self.done.is_set():
            return
        self.finish_reason = reason
        self.done.set()
        if self.on_end is not None:
            self.on_end(self)
        if self.sink is not None:
            self.sink.put((self, None))

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.finish("error")

    @property
    def generation(self) -> Generation:
        assert self.finish_reason is not None
        return Generation(tuple(self.tokens), self.finish_reason)


class Engine(Protocol):
    name: str
    context_window: int
    eos_id: int
    on_death: Callable[[BaseException], None] | None  # called on the engine thread if it dies

    def submit(self, rows: Sequence[Row]) -> None:
        """Starts generating for `rows`; they end through Row.finish or Row.fail, never silently."""

    def close(self) -> None:
        """Ends every row still in flight (cancelled), stops the engine thread and frees the model."""


class EngineThread:
    """What both engines share: one thread that loads the model and runs every step (on CPU, torch
    runs up to 1.5x slower in a thread other than the one that first used its OpenMP pool), an
    inbox of submitted rows, a clean close, and a death that fails every row and calls `on_death`."""

    name: str

    def __init__(self, load: Callable[[], None], *, thread_name: str) -> None:
        """Starts the thread, which calls `load`; returns once it has (raising what it raised)."""
        self.on_death: Callable[[BaseException], None] | None = None
        self._inbox: collections.deque[Row] = collections.deque()
        self._wake = threading.Condition()  # guards the inbox and the flags below
        self._closing = False
        self._dead: BaseException | None = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name=thread_name, daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, rows: Sequence[Row]) -> None:
        with self._wake:
            if self._dead is not None or self._closing:
                raise InternalError("the engine has stopped; the server log has the details")
            now = time.monotonic()
            for row in rows:
                row.submitted_at = now
            self._inbox.extend(rows)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self._unload()

    def _loop(self) -> None:
        """Runs until `_closing`; an exception out of it is the engine's death."""
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
            log.critical("the %s engine died", self.name, exc_info=exc)
            self._dead = exc
            self._end_all(functools.partial(Row.fail, error=exc))
            if self.on_death is not None:
                self.on_death(exc)
            return
        self._end_all(functools.partial(Row.finish, reason="cancelled"))

    def _end_all(self, end: Callable[[Row], None]) -> None:
        with self._wake:
            rows = [*self._drop_in_flight(), *self._inbox]
            self._inbox.clear()
        for row in rows:
            end(row)


@dataclass(frozen=True)
class EngineChoice:
    name: str  # transformers | vllm
    why: str


def choose_engine(wanted: str, *, gpus: int, vllm_installed: bool) -> EngineChoice:
    """`auto` takes vLLM where it can serve (a GPU and vLLM installed); asking for vLLM where it
    cannot run is an error, never a silent fallback."""
    if wanted == "transformers":
        return EngineChoice("transformers", "MIXTRAL_ENGINE=transformers")
    if wanted == "vllm":
        if not vllm_installed:
            raise ConfigError("MIXTRAL_ENGINE=vllm, but vLLM is not installed in this environment")
        return EngineChoice("vllm", "MIXTRAL_ENGINE=vllm")
    if gpus and vllm_installed:
        return EngineChoice("vllm", f"MIXTRAL_ENGINE=auto: {gpus} GPU(s) visible and vLLM installed")
    reason = "no GPU visible" if not gpus else "vLLM is not installed"
    return EngineChoice("transformers", f"MIXTRAL_ENGINE=auto: {reason}")


def load_engine(checkpoint: Checkpoint, config: ServerConfig) -> Engine:
    """Loads the engine the config asks for; the log names it and why."""
    import torch

    choice = choose_engine(config.engine, gpus=torch.cuda.device_count(),
                           vllm_installed=importlib.util.find_spec("vllm") is not None)
    log.info("engine: %s (%s)", choice.name, choice.why)
    if choice.name == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine.load(checkpoint, config)
    from .transformers_engine import TransformersEngine

    return TransformersEngine.load(checkpoint, config)
