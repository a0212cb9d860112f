"""Continuous batching: one thread owns the engine, callers' rows join and leave between steps.

Callers (HTTP threads, MLflow predict, batch jobs) submit rows and wait on them. Between two
decode steps the scheduler admits waiting rows into the running batch, up to `max_batch` rows,
instead of letting the batch drain first. Each admission costs a prefill pass, so newcomers join
in groups: once half the batch is free, or once the oldest has waited `admit_after_s`. The
waiting line is bounded: past `max_queue` rows a caller gets `Overloaded` (429) at once.

The same thread loads the model: on CPU, torch runs up to 1.5x slower in a thread other than the
one that first used its OpenMP pool (measured on 2 cores), so every torch call stays on this one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

from .engine import Batch, Engine, Row
from .errors import Overloaded

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, load: Callable[[], Engine], *, max_batch: int, max_queue: int,
                 retry_after_s: int = 2, admit_after_s: float = 0.05) -> None:
        """Starts the engine thread, which calls `load`; returns once it has (raising what it raised)."""
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.admit_after_s = admit_after_s
        self._waiting: collections.deque[Row] = collections.deque()
        self._running = 0
        self._wake = threading.Condition()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name="mixtral-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, rows: Sequence[Row]) -> None:
        """Queues a request's rows together, or refuses them all when the line is full."""
        with self._wake:
            if len(self._waiting) + len(rows) > self.max_queue:
                raise Overloaded(
                    f"the server is at capacity ({self._running} rows generating, {len(self._waiting)} waiting); "
                    f"retry in {self.retry_after_s} s",
                    retry_after=self.retry_after_s,
                )
            now = time.monotonic()
            for row in rows:
                row.submitted_at = now
            self._waiting.extend(rows)
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(rows generating, rows waiting)."""
        return self._running, len(self._waiting)

    def _run(self, load: Callable[[], Engine]) -> None:
        try:
            self.engine = load()
        except BaseException as exc:
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        self._loop()

    def _loop(self) -> None:
        batch: Batch | None = None
        while True:
            # A failure fails the rows it touched (a newcomer's prefill, or the batch's step), never
            # the scheduler.
            admitted = self._admit(batch)
            if admitted:
                batch = self._prefill(batch, admitted)
            if batch is not None:
                try:
                    batch = self.engine.step(batch)
                except Exception as exc:
                    _fail(batch.rows, exc)
                    batch = None
            self._running = len(batch.rows) if batch else 0

    def _prefill(self, batch: Batch | None, rows: list[Row]) -> Batch | None:
        """Adds `rows` to the batch; if their joint prefill fails, retries them one by one, so only
        the row that fails is failed."""
        try:
            return self.engine.join(batch, self.engine.prefill(rows))
        except Exception as exc:
            if len(rows) == 1:
                _fail(rows, exc)
                return batch
        for row in rows:
            batch = self._prefill(batch, [row])
        return batch

    def _admit(self, batch: Batch | None) -> list[Row]:
        with self._wake:
            while batch is None and not self._waiting:
                self._wake.wait()
            room = self.max_batch - (len(batch.rows) if batch else 0)
            if batch is not None and not self._worth_a_prefill(room):
                return []
            admitted = []
            while self._waiting and len(admitted) < room:
                row = self._waiting.popleft()
                if row.cancelled or (row.deadline is not None and time.monotonic() >= row.deadline):
                    row.finish("cancelled" if row.cancelled else "time_limit")
                    continue
                admitted.append(row)
            return admitted

    def _worth_a_prefill(self, room: int) -> bool:
        """Joining costs a prefill pass, so a running batch takes newcomers in groups: once half of it
        is free, or once the oldest newcomer has waited `admit_after_s`."""
        if not self._waiting or room == 0:
            return False
        waited = time.monotonic() - self._waiting[0].submitted_at
        return room >= max(1, self.max_batch // 2) or waited >= self.admit_after_s


def _fail(rows: Sequence[Row], error: Exception) -> None:
    log.error("generation failed for %d rows", len(rows), exc_info=error)
    for row in rows:
        if not row.done.is_set():
            row.fail(error)
