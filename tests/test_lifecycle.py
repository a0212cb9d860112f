"""The engine's lifecycle: a fault that persists is its death, so is a step stalled past the limit, waiting
rows can end behind a full batch, a failed join never shows a caller a first token twice, close never frees a
model under a running step, a dead vLLM engine is never shared, and a scorer let go frees its model."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mixtral_endpoint.doors.openai import protocol as openai_protocol
from mixtral_endpoint.doors.openai import routes as openai_routes
from mixtral_endpoint.engines import vllm_engine
from mixtral_endpoint.engines.engine import RETRY_AFTER_DEATH_S, EngineStalled, EngineThread, Row
from mixtral_endpoint.engines.transformers.transformers_engine import TransformersEngine
from mixtral_endpoint.engines.vllm_engine import VllmEngine
from mixtral_endpoint.model.checkpoint import Checkpoint
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import ModelNotReady
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.serving.service import Scorer

from .conftest import SERVER_ENV
from .test_engines import DyingLLM

LONG = SamplingSettings(max_new_tokens=200, ignore_eos=True)


@pytest.fixture
def engine(checkpoint: Checkpoint) -> Iterator[TransformersEngine]:
    """Our engine with room for two rows and its own model copy, which a test may break."""
    config = ServerConfig.from_env({"MIXTRAL_ENGINE": "transformers", "MIXTRAL_MAX_TOTAL_TOKENS": "512",
                                    "MIXTRAL_MAX_BATCH_SIZE": "2", "MIXTRAL_MAX_PROMPTS": "2"})
    engine = TransformersEngine.load(checkpoint, config)
    yield engine
    engine.close()


def patch_forward(engine: TransformersEngine, wrap: Callable[[Callable[..., object]], Callable[..., object]]) -> None:
    model = engine.stepper.model
    model.forward = wrap(model.forward)


def slowed(forward: Callable[..., object]) -> Callable[..., object]:
    """Each pass as slow as a large model's, so a row stays in flight while the test acts."""

    def slow(*args: object, **kwargs: object) -> object:
        time.sleep(0.02)
        return forward(*args, **kwargs)

    return slow


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_fault_that_persists_kills_the_engine(engine: TransformersEngine):
    """Every pass raising (a poisoned device) fails the rows in flight, and the engine dies at once
    instead of answering 500 to every later request."""
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    armed = threading.Event()

    def broken(forward: Callable[..., object]) -> Callable[..., object]:
        def maybe(*args: object, **kwargs: object) -> object:
            if armed.is_set():
                raise RuntimeError("a fault in every pass from now on")
            time.sleep(0.02)
            return forward(*args, **kwargs)
        return maybe

    patch_forward(engine, broken)
    rows = [Row([1, 2, 3], LONG), Row([1, 4], LONG)]
    engine.submit(rows)
    wait_until(lambda: all(row.tokens for row in rows))
    armed.set()
    assert all(row.done.wait(30) for row in rows)
    assert {row.finish_reason for row in rows} == {"error"}
    wait_until(lambda: engine.dead is not None)
    assert len(deaths) == 1
    with pytest.raises(ModelNotReady) as refused:
        engine.submit([Row([1], LONG)])
    assert refused.value.status == 503 and refused.value.retry_after == RETRY_AFTER_DEATH_S


def test_an_error_saying_the_device_is_lost_kills_the_engine_even_if_the_next_pass_works(engine: TransformersEngine):
    calls = {"n": 0}

    def once(forward: Callable[..., object]) -> Callable[..., object]:
        def maybe(*args: object, **kwargs: object) -> object:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return forward(*args, **kwargs)
        return maybe

    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    patch_forward(engine, once)
    row = Row([1, 2, 3], LONG)
    engine.submit([row])
    assert row.done.wait(30) and row.finish_reason == "error"
    wait_until(lambda: bool(deaths))
    assert engine.dead is not None


def test_a_fault_in_one_pass_fails_its_rows_and_the_engine_serves_on(engine: TransformersEngine):
    calls = {"n": 0}

    def once(forward: Callable[..., object]) -> Callable[..., object]:
        def maybe(*args: object, **kwargs: object) -> object:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("out of memory for this batch")
            return forward(*args, **kwargs)
        return maybe

    patch_forward(engine, once)
    row = Row([1, 2, 3], LONG)
    engine.submit([row])
    assert row.done.wait(30) and row.finish_reason == "error"
    again = Row([1, 2, 3], SamplingSettings(max_new_tokens=4))
    engine.submit([again])
    assert again.done.wait(30) and again.finish_reason == "length" and engine.dead is None


def test_waiting_rows_that_are_cancelled_or_expire_leave_the_line_while_the_batch_is_full(
        engine: TransformersEngine):
    """A caller that went away gives its place back at once, not when a place in the batch frees up."""
    patch_forward(engine, slowed)
    running = [Row([1, 2, 3], LONG), Row([1, 5], LONG)]  # the batch's two places, for ~4 s
    engine.submit(running)
    wait_until(lambda: engine.row_counts[0] == 2)
    cancelled, expiring = Row([1, 6], LONG), Row([1, 7], LONG, deadline=time.monotonic() + 0.2)
    engine.submit([cancelled, expiring])
    cancelled.cancel()
    assert cancelled.done.wait(2) and cancelled.finish_reason == "cancelled"
    assert expiring.done.wait(2) and expiring.finish_reason == "time_limit"
    assert not any(row.done.is_set() for row in running)
    assert engine.row_counts == (2, 0)


def test_a_failed_join_fails_both_batches_and_never_shows_a_first_token_twice(engine: TransformersEngine):
    patch_forward(engine, slowed)
    join = engine.stepper.join
    failures = {"left": 1}

    def failing_join(batch: object, new: object) -> object:
        if batch is not None and new is not None and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("out of memory while growing the cache")
        return join(batch, new)

    engine.stepper.join = failing_join
    running = Row([1, 2, 3], LONG)
    engine.submit([running])
    wait_until(lambda: len(running.tokens) >= 2)
    newcomer = Row([1, 9, 9], LONG)
    engine.submit([newcomer])
    assert newcomer.done.wait(30) and running.done.wait(30)
    # The newcomer's first token went to its caller before the join failed: it is never prefilled again.
    assert newcomer.finish_reason == "error" and len(newcomer.tokens) == 1
    assert running.finish_reason == "error"  # its cache may be half extended
    after = Row([1, 2, 3], SamplingSettings(max_new_tokens=3))
    engine.submit([after])
    assert after.done.wait(30) and after.finish_reason == "length"


class StuckEngine(EngineThread):
    """An engine whose one step does not end until the test lets it."""

    name = "stuck"
    close_timeout_s = 0.2

    def __init__(self) -> None:
        self.release = threading.Event()
        self.model: object | None = None

        def load() -> None:
            self.model = object()

        super().__init__(load, thread_name="stuck-engine")

    def _loop(self) -> None:
        self.release.wait(30)

    def _drop_in_flight(self) -> list[Row]:
        return []

    def _unload(self) -> None:
        self.model = None


def test_close_never_frees_the_model_under_a_step_that_still_runs():
    engine = StuckEngine()
    engine.close()  # gives up waiting after close_timeout_s
    assert engine.model is not None and engine._thread.is_alive()
    engine.release.set()
    engine._thread.join(10)
    assert engine.model is None  # freed by the engine thread once its step ended


class SteppingEngine(EngineThread):
    """An engine whose step is the test's: it takes the rows waiting, then calls `step(rows)`, over and over."""

    name = "stepping"

    def __init__(self, step: Callable[[list[Row]], None]) -> None:
        self.step = step
        self.running: list[Row] = []
        super().__init__(lambda: None, thread_name="stepping-engine")

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.running and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                self.running += self._inbox
                self._inbox.clear()
            with self._stepping():
                self.step(self.running)

    def _drop_in_flight(self) -> list[Row]:
        rows, self.running = self.running, []
        return rows

    def _unload(self) -> None:
        pass


def test_a_step_stalled_past_the_limit_kills_the_engine_and_answers_every_row_at_once():
    """The engine's thread stays blocked; its watchdog fails the rows in the step and in the inbox, refuses
    later submits with a 503 and calls on_death, so that the worker exits."""
    release, steps = threading.Event(), []

    def step(rows: list[Row]) -> None:
        steps.append(list(rows))
        release.wait(30)

    engine = SteppingEngine(step)
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    engine.watch(0.3)
    running = Row([1, 2, 3], LONG)
    submitted_at = time.monotonic()
    engine.submit([running])
    wait_until(lambda: engine.running == [running])
    waiting = Row([1, 2, 3], LONG)
    engine.submit([waiting])
    assert running.done.wait(5) and waiting.done.wait(5)
    assert 0.3 <= time.monotonic() - submitted_at < 2
    assert isinstance(running.error, EngineStalled) and waiting.error is running.error
    wait_until(lambda: bool(deaths))  # called once every row has failed
    assert engine.dead is running.error and deaths == [running.error]
    with pytest.raises(ModelNotReady) as refused:
        engine.submit([Row([1], LONG)])
    assert refused.value.retry_after == RETRY_AFTER_DEATH_S
    release.set()  # a step that returns after all: the loop ends, nothing runs again
    engine._thread.join(5)
    assert not engine._thread.is_alive() and steps == [[running]]


def test_steps_under_the_limit_and_idle_time_longer_than_it_are_no_stall():
    def step(rows: list[Row]) -> None:
        time.sleep(0.05)
        for row in list(rows):
            row.emit(7, time.monotonic(), len(rows))
            if len(row.tokens) == 10:
                rows.remove(row)
                row.finish("length")

    engine = SteppingEngine(step)
    engine.watch(0.2)
    time.sleep(0.5)  # idle, with nothing to step
    row = Row([1, 2, 3], LONG)
    engine.submit([row])  # ten steps of 0.05 s: half a second of steps, each under the limit
    assert row.done.wait(10) and row.finish_reason == "length" and engine.dead is None
    engine.close()
    engine._watchdog.join(5)  # it ends once the engine closes
    assert not engine._thread.is_alive() and not engine._watchdog.is_alive()


def test_a_forward_pass_that_blocks_is_a_stall_on_our_engine(engine: TransformersEngine):
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    armed, release = threading.Event(), threading.Event()

    def blocking(forward: Callable[..., object]) -> Callable[..., object]:
        def maybe(*args: object, **kwargs: object) -> object:
            if armed.is_set():
                release.wait(30)
            time.sleep(0.02)
            return forward(*args, **kwargs)
        return maybe

    patch_forward(engine, blocking)
    engine.watch(0.5)
    row = Row([1, 2, 3], LONG)
    engine.submit([row])
    wait_until(lambda: len(row.tokens) >= 2)  # prefill and decode steps under the limit
    armed.set()
    assert row.done.wait(10) and isinstance(row.error, EngineStalled)
    wait_until(lambda: bool(deaths))
    assert deaths == [row.error]
    with pytest.raises(ModelNotReady):
        engine.submit([Row([1], LONG)])
    release.set()


class StallingLLM(DyingLLM):
    """vLLM's LLMEngine whose step blocks until the test lets it (a hung GPU, a collective waiting on a dead peer)."""

    release = threading.Event()

    def step(self) -> list:
        self.release.wait(30)
        return []


def test_a_vllm_step_that_blocks_is_a_stall():
    engine = VllmEngine(StallingLLM, eos_id=2, context_window=512, vocab_size=32000, max_num_seqs=8)
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    engine.watch(0.3)
    row = Row([1, 2, 3], SamplingSettings(max_new_tokens=4))
    engine.submit([row])
    assert row.done.wait(10) and isinstance(row.error, EngineStalled)
    wait_until(lambda: bool(deaths))
    assert deaths == [row.error]
    with pytest.raises(ModelNotReady):
        engine.submit([Row([1], LONG)])
    StallingLLM.release.set()
    engine._thread.join(5)
    assert not engine._thread.is_alive()


def test_a_dead_vllm_engine_is_not_handed_to_the_next_load(checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(vllm_engine, "_shared", {})
    monkeypatch.setattr(vllm_engine, "_build_llm_engine", lambda args, **_: DyingLLM())
    config = ServerConfig.from_env({**SERVER_ENV, "MIXTRAL_ENGINE": "vllm"})
    first = VllmEngine.load(checkpoint, config)
    row = Row([1, 2, 3], SamplingSettings(max_new_tokens=4))
    first.submit([row])
    assert row.done.wait(30) and row.finish_reason == "error"
    wait_until(lambda: first.dead is not None)
    again = VllmEngine.load(checkpoint, config)
    assert again is not first and again.dead is None
    again.close()


def test_loads_sharing_a_vllm_engine_share_one_line_and_each_hears_of_its_death(
        checkpoint: Checkpoint, tokenizer, monkeypatch: pytest.MonkeyPatch):
    """Two loads in one process (Spark, an MLflow reload) share vLLM's engine: one line admits against its
    cache for both, and each load's on_death runs when it dies."""
    monkeypatch.setattr(vllm_engine, "_shared", {})
    monkeypatch.setattr(vllm_engine, "_build_llm_engine", lambda args, **_: DyingLLM())
    config = ServerConfig.from_env({**SERVER_ENV, "MIXTRAL_ENGINE": "vllm"})
    first, second = (Scorer(VllmEngine.load(checkpoint, config), tokenizer, config) for _ in range(2))
    assert first.engine is second.engine and first.line is second.line
    deaths: list[str] = []
    first.engine.on_death.append(lambda exc: deaths.append("first"))
    second.engine.on_death.append(lambda exc: deaths.append("second"))
    row = Row([1, 2, 3], SamplingSettings(max_new_tokens=4))
    first.line.take([row])
    assert row.done.wait(30) and row.finish_reason == "error"
    wait_until(lambda: len(deaths) == 2)
    assert sorted(deaths) == ["first", "second"]
    first.close()
    second.close()


def test_a_scorer_let_go_closes_its_engine_and_frees_its_model(tiny_checkpoint: Path):
    """Loading the model again in one process (a notebook, mlflow.pyfunc.load_model twice) keeps no
    earlier engine thread or model copy alive."""
    scorer = Scorer.load(tiny_checkpoint, ServerConfig.from_env({**SERVER_ENV, "MIXTRAL_ENGINE": "transformers"}))
    model = weakref.ref(scorer.engine.stepper.model)
    thread = scorer.engine._thread
    del scorer
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()
    gc.collect()
    assert model() is None


def test_an_openai_stream_whose_first_chunk_cannot_be_sent_cancels_its_row(scorer: Scorer):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True,
            "ignore_eos": True}
    parsed = openai_protocol.parse(body, "chat", scorer.config.limits, extra_parameters="pass-through")
    events = scorer.stream(parsed.request, "test")
    chunks = openai_routes._events(parsed, events, "test")
    assert "assistant" in next(chunks)  # the role chunk
    chunks.close()  # the server's write of the role chunk failed: the caller has gone
    assert events.row.done.wait(30) and events.row.finish_reason == "cancelled"
    assert len(events.row.tokens) < 64
