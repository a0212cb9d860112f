"""The bounded line in front of either engine: admission by what the engine can hold.

A row goes to the engine while the engine's Capacity allows it: a place in its batch, and on vLLM room
in its paged KV cache for the row's prompt + max_new_tokens (reserved whole, so vLLM never has to
preempt a row it took). Otherwise the row waits here, first come first served, and goes to the engine
as soon as rows ending there make room. A request that would make more than `max_queue` rows wait is
refused whole (429 with Retry-After).

Rows end on the engine thread (Row.finish calls `on_end`), which hands the next rows to the engine
from there: the line's lock is never held while the engine's is taken.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Sequence

from mixtral_endpoint.engines.engine import Engine, Row
from mixtral_endpoint.protocol.errors import Overloaded, ScoringError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2
_lines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its one line
_lines_lock = threading.Lock()


def line_for(engine: Engine, max_queue: int) -> Line:
    """The engine's line: one per engine, shared by every load that shares it (a process holds one vLLM
    engine for all its loads), so no two loads admit against the same cache as if each had it alone."""
    with _lines_lock:
        line = _lines.get(engine)
        if line is None:
            line = _lines[engine] = Line(engine, max_queue)
        elif line.max_queue != max_queue:
            log.warning("this engine's line already lets %d rows wait; a later load's %d is not applied",
                        line.max_queue, max_queue)
        return line


class Line:
    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.capacity = engine.capacity
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._running: dict[Row, int] = {}  # rows in the engine -> their reserved cache tokens
        self._reserved = 0
        self._waiting: collections.deque[Row] = collections.deque()

    @property
    def limit(self) -> int:
        """Rows in flight at most: a full batch and a full queue."""
        return self.capacity.rows + self.max_queue

    @property
    def counts(self) -> tuple[int, int, int]:
        """(rows in the engine, rows waiting here, cache tokens reserved)."""
        with self._lock:
            return len(self._running), len(self._waiting), self._reserved

    def take(self, rows: Sequence[Row]) -> None:
        """Hands `rows` to the engine, or to the queue where the engine is full; raises Overloaded, taking
        none of them, where the queue has no room for the rest. What the engine raises, it raises."""
        for row in rows:
            row.on_end = self._release
        with self._lock:
            fitting = self._fitting(rows) if not self._waiting else 0
            if len(self._waiting) + len(rows) - fitting > self.max_queue:
                raise Overloaded(f"the server is at capacity ({len(self._running)} rows generating, "
                                 f"{len(self._waiting)} waiting); retry in {RETRY_AFTER_S} s",
                                 retry_after=RETRY_AFTER_S)
            now = rows[:fitting]
            self._start(now)
            self._waiting.extend(rows[fitting:])
        if now:
            self.engine.submit(now)

    def cancel(self, rows: Sequence[Row]) -> None:
        """Stops each row: at the engine's next step, or now where it is still waiting here."""
        for row in rows:
            row.cancel()
            with self._lock:
                waiting = row in self._waiting
            if waiting:
                row.finish("cancelled")  # _release takes it out of the queue

    def expire(self, rows: Sequence[Row], now: float) -> None:
        """Ends with "time_limit" those of `rows` still waiting here past their deadline: the engine ends its
        own rows at theirs, but a row that never got a place would otherwise hold its caller until one frees."""
        with self._lock:
            expired = [row for row in rows if row.expired(now) and row in self._waiting]
        for row in expired:
            row.finish("time_limit")  # _release takes it out of the queue

    def _fitting(self, rows: Sequence[Row]) -> int:
        """How many of `rows`, in order, the engine can take now."""
        count, reserved = len(self._running), self._reserved
        limit = self.capacity.kv_tokens
        for n, row in enumerate(rows):
            reserved += self.capacity.cost(row)
            count += 1
            if count > self.capacity.rows or (limit is not None and reserved > limit):
                return n
        return len(rows)

    def _start(self, rows: Sequence[Row]) -> None:
        for row in rows:
            cost = self.capacity.cost(row)
            self._running[row] = cost
            self._reserved += cost

    def _release(self, row: Row) -> None:
        with self._lock:
            cost = self._running.pop(row, None)
            if cost is None:
                if row in self._waiting:
                    self._waiting.remove(row)
                return
            self._reserved -= cost
            ready = [self._waiting.popleft() for _ in range(self._fitting(self._waiting))]
            self._start(ready)
        if ready:
            try:
                self.engine.submit(ready)
            except ScoringError as exc:  # the engine died or is closing: no waiting row can run
                self._fail_all(ready, exc)

    def _fail_all(self, ready: list[Row], error: ScoringError) -> None:
        """Fails `ready` and every row still waiting. They leave the line before they fail, so each one's
        _release finds nothing to hand on: no recursion, whatever the queue's length."""
        with self._lock:
            for r in ready:
                self._reserved -= self._running.pop(r, 0)
            doomed = [*ready, *self._waiting]
            self._waiting.clear()
        for r in doomed:
            r.fail(error)
