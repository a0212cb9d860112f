"""The line in front of the engine: rows go to the engine while its batch and KV cache hold them, wait
in order otherwise, and past the queue the request is refused whole. Pure logic, on a fake engine."""

from __future__ import annotations

import threading
import time

import pytest

from mixtral_endpoint.engines.engine import Capacity, Row
from mixtral_endpoint.protocol.errors import ModelNotReady, Overloaded
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.serving.line import Line


class FakeEngine:
    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.taken: list[Row] = []
        self.refuse: Exception | None = None

    def submit(self, rows: list[Row]) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.taken.extend(rows)


def row(prompt_tokens: int = 10, new_tokens: int = 10) -> Row:
    return Row([1] * prompt_tokens, SamplingSettings(max_new_tokens=new_tokens))


def test_rows_past_the_batch_wait_and_go_in_order_as_places_free():
    engine = FakeEngine(Capacity(rows=2))
    line = Line(engine, max_queue=4)
    rows = [row() for _ in range(4)]
    line.take(rows[:3])
    line.take(rows[3:])
    assert engine.taken == rows[:2] and line.counts[:2] == (2, 2)
    rows[1].finish("length")
    assert engine.taken == rows[:3]
    rows[0].finish("stop")
    assert engine.taken == rows and line.counts[:2] == (2, 0)


def test_the_kv_cache_holds_rows_by_their_prompt_and_max_new_tokens_in_whole_blocks():
    # 20 + 10 tokens take two blocks of 16: three such rows are 96 tokens, over a 64-token cache.
    engine = FakeEngine(Capacity(rows=8, kv_tokens=64, block_tokens=16))
    line = Line(engine, max_queue=4)
    rows = [row(20, 10) for _ in range(3)]
    line.take(rows)
    assert engine.taken == rows[:2] and line.counts == (2, 1, 64)
    rows[0].finish("length")
    assert engine.taken == rows and line.counts == (2, 0, 64)


def test_a_short_row_does_not_overtake_one_that_waits_for_room():
    engine = FakeEngine(Capacity(rows=8, kv_tokens=64, block_tokens=16))
    line = Line(engine, max_queue=4)
    first, long_one, short = row(30, 2), row(40, 8), row(2, 2)
    line.take([first])
    line.take([long_one])
    line.take([short])  # would fit beside `first`, but `long_one` came before it
    assert engine.taken == [first]
    first.finish("length")
    assert engine.taken == [first, long_one, short]


def test_a_full_queue_refuses_the_whole_request_and_takes_none_of_it():
    engine = FakeEngine(Capacity(rows=1))
    line = Line(engine, max_queue=2)
    line.take([row(), row()])
    before = line.counts
    with pytest.raises(Overloaded) as refused:
        line.take([row(), row()])  # one place left in the queue, two rows
    assert refused.value.retry_after and line.counts == before
    line.take([row()])
    assert line.counts[:2] == (1, 2)


def test_a_waiting_row_cancelled_ends_now_and_gives_its_place_back():
    engine = FakeEngine(Capacity(rows=1))
    line = Line(engine, max_queue=1)
    running, waiting = row(), row()
    line.take([running])
    line.take([waiting])
    line.cancel([waiting])
    assert waiting.done.is_set() and waiting.finish_reason == "cancelled" and line.counts[:2] == (1, 0)
    line.take([row()])  # its place in the queue is free again
    running.finish("length")
    assert waiting not in engine.taken


def test_rows_waiting_when_the_engine_dies_fail_with_its_error_and_are_not_lost():
    engine = FakeEngine(Capacity(rows=1))
    line = Line(engine, max_queue=2)
    running, waiting = row(), [row(), row()]
    line.take([running])
    line.take(waiting)
    engine.refuse = ModelNotReady("the engine failed", retry_after=30)
    running.fail(RuntimeError("CUDA error"))
    assert all(r.done.is_set() and isinstance(r.error, ModelNotReady) for r in waiting)
    assert line.counts == (0, 0, 0)


def test_a_dead_engine_fails_a_queue_of_any_length_without_recursion():
    """Each failed row used to release the next from inside its own release: one frame per waiting row,
    a RecursionError on the engine thread before the worker could be replaced."""
    engine = FakeEngine(Capacity(rows=1))
    line = Line(engine, max_queue=5000)
    running, waiting = row(), [row() for _ in range(5000)]
    line.take([running])
    line.take(waiting)
    engine.refuse = ModelNotReady("the engine failed", retry_after=30)
    running.fail(RuntimeError("CUDA error"))
    assert all(r.done.is_set() and isinstance(r.error, ModelNotReady) for r in waiting)
    assert line.counts == (0, 0, 0)


class SlowToSay(threading.Event):
    """An Event slow to say whether it is set: widens the window between a check and the set after it."""

    def is_set(self) -> bool:
        answer = super().is_set()
        time.sleep(0.05)
        return answer


def test_a_row_ended_by_two_threads_at_once_ends_once():
    """The engine thread finishing a row while a caller cancels it: its place in the line is given back once."""
    ended: list[Row] = []
    r = row()
    r.done = SlowToSay()
    r.on_end = ended.append
    both = [threading.Thread(target=r.finish, args=("length",)), threading.Thread(target=r.fail, args=(OSError(),))]
    for t in both:
        t.start()
    for t in both:
        t.join()
    assert ended == [r] and (r.finish_reason, r.error is None) in (("length", True), ("error", False))


def test_a_row_waiting_past_its_deadline_ends_time_limit_without_a_place_freeing():
    engine = FakeEngine(Capacity(rows=1))
    line = Line(engine, max_queue=2)
    running, waiting = row(), Row([1] * 10, SamplingSettings(max_new_tokens=10), deadline=time.monotonic() + 0.05)
    line.take([running, waiting])
    line.expire([running, waiting], time.monotonic())
    assert not waiting.done.is_set()  # not yet past its deadline
    time.sleep(0.06)
    line.expire([running, waiting], time.monotonic())
    assert waiting.finish_reason == "time_limit" and not running.done.is_set() and line.counts[:2] == (1, 0)
    assert waiting not in engine.taken
