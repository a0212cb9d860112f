"""Our engine: continuous batching on transformers, one thread owning the model.

Callers (HTTP threads, MLflow predict, batch jobs) submit rows and read their tokens. Between two
decode steps the engine thread admits waiting rows into the running batch, up to `max_batch` rows,
instead of letting the batch drain first. Each admission costs a prefill pass, so newcomers join
in groups: once half the batch is free, or once the oldest has waited `admit_after_s`.

Failures: a failed prefill is retried row by row, so only the row that fails is failed; a failed
decode step, or a failed join of newcomers to the batch, fails every row of the batch (their shared
KV cache is then in an unknown state). After any failed pass the model runs a one-token probe: if
that fails too, or the error says the device is lost, the fault persists and the engine dies. Its
death (that, any error outside a pass, or a pass that stalls past the limit) fails every row in flight
and calls `on_death`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mixtral_endpoint.engines.engine import Capacity, EngineThread, Row, device_lost
from mixtral_endpoint.engines.transformers.stepper import Batch, Stepper
from mixtral_endpoint.model.checkpoint import require_unquantized
from mixtral_endpoint.model.placement import plan_placement
from mixtral_endpoint.protocol.config import DEFAULT_BATCH_SIZE
from mixtral_endpoint.protocol.errors import ConfigError

if TYPE_CHECKING:
    from mixtral_endpoint.model.checkpoint import Checkpoint
    from mixtral_endpoint.protocol.config import ServerConfig

log = logging.getLogger(__name__)


class EngineFault(RuntimeError):
    """A fault that outlives the pass it broke: the model cannot run anything more."""


class TransformersEngine(EngineThread):
    name = "transformers"
    grammar_form = "compiled"

    def __init__(self, load: Callable[[], Stepper], *, max_batch: int, admit_after_s: float = 0.05) -> None:
        self.max_batch = max_batch
        self.capacity = Capacity(rows=max_batch)  # its cache holds max_batch rows of the whole context
        self.admit_after_s = admit_after_s
        self._batch: Batch | None = None
        self._joining: list[Row] = []  # admitted, not yet in the batch

        def load_stepper() -> None:
            self.stepper = load()

        super().__init__(load_stepper, thread_name="mixtral-engine")

    @classmethod
    def load(cls, checkpoint: Checkpoint, config: ServerConfig) -> TransformersEngine:
        require_unquantized(checkpoint, cls.name)
        if config.vllm_settings():
            raise ConfigError(f"{', '.join(config.vllm_settings())}: vLLM's settings, but the engine is ours "
                              "(MIXTRAL_ENGINE=transformers, or auto without a GPU); unset them or use vLLM")
        tokens = min(config.max_total_tokens or checkpoint.context_window, checkpoint.context_window)
        rows = config.max_batch_size or DEFAULT_BATCH_SIZE
        plan = plan_placement(checkpoint, config, rows=rows, tokens=tokens)
        return cls(lambda: Stepper.load(checkpoint, plan, offload_folder=config.offload_folder or None),
                   max_batch=rows)

    @property
    def context_window(self) -> int:
        return self.stepper.context_window

    @property
    def eos_id(self) -> int:
        return self.stepper.eos_id

    @property
    def row_counts(self) -> tuple[int, int]:
        """(rows generating, rows waiting)."""
        batch = self._batch
        return (len(batch.rows) if batch else 0), len(self._inbox)

    def _drop_in_flight(self) -> list[Row]:
        rows = [*(self._batch.rows if self._batch else []), *self._joining]
        self._batch, self._joining = None, []
        return rows

    def _unload(self) -> None:
        self.__dict__.pop("stepper", None)

    def _loop(self) -> None:
        while not self._closing:
            self._joining = self._admit()
            with self._stepping():  # a prefill and a decode step, with the probe after a failure
                if self._joining:
                    self._batch = self._prefill(self._batch, self._joining)
                    self._joining = []
                if self._batch is not None:
                    try:
                        self._batch = self.stepper.step(self._batch)
                    except Exception as exc:
                        failed, self._batch = self._batch.rows, None
                        self._failed(failed, exc)

    def _prefill(self, batch: Batch | None, rows: list[Row]) -> Batch | None:
        """Adds `rows` to the batch; if their joint prefill fails, retries them one by one, so only
        the row that fails is failed."""
        try:
            new = self.stepper.prefill(rows)
        except Exception as exc:
            if len(rows) == 1:
                self._failed(rows, exc)
                return batch
            # A row whose caller has seen a first token is never prefilled again.
            if shown := [row for row in rows if row.tokens]:
                self._failed(shown, exc)
            for row in rows:
                if not row.tokens:
                    batch = self._prefill(batch, [row])
            return batch
        try:
            return self.stepper.join(batch, new)
        except Exception as exc:
            # The running batch's cache may be half extended: neither batch can go on.
            self._failed([*(batch.rows if batch else []), *(new.rows if new else [])], exc)
            return None

    def _failed(self, rows: Sequence[Row], error: Exception) -> None:
        """Fails the rows of a pass that raised; raises EngineFault if the fault persists."""
        log.error("generation failed for %d rows", len(rows), exc_info=error)
        for row in rows:
            row.fail(error)
        if device_lost(error):
            raise EngineFault("the device is lost") from error
        try:
            self.stepper.probe()
        except Exception as probe_error:
            raise EngineFault("a one-token probe fails too: the model cannot run") from probe_error

    def _admit(self) -> list[Row]:
        batch = self._batch
        with self._wake:
            while batch is None and not self._inbox and not self._closing:
                self._wake.wait()
            self._drop_ended(time.monotonic())  # rows waiting behind a full batch can end too
            room = self.max_batch - (len(batch.rows) if batch else 0)
            if self._closing or (batch is not None and not self._worth_a_prefill(room)):
                return []
            admitted = []
            while self._inbox and len(admitted) < room:
                admitted.append(self._inbox.popleft())
            return admitted

    def _drop_ended(self, now: float) -> None:
        """Ends the waiting rows that were cancelled or ran out of time, so they give their places back."""
        if any(row.cancelled or row.expired(now) for row in self._inbox):
            waiting = list(self._inbox)
            self._inbox.clear()
            for row in waiting:
                if row.cancelled or row.expired(now):
                    row.finish("cancelled" if row.cancelled else "time_limit")
                else:
                    self._inbox.append(row)

    def _worth_a_prefill(self, room: int) -> bool:
        """Joining costs a prefill pass, so a running batch takes newcomers in groups: once half of it
        is free, or once the oldest newcomer has waited `admit_after_s`."""
        if not self._inbox or room == 0:
            return False
        waited = time.monotonic() - self._inbox[0].submitted_at
        return room >= max(1, self.max_batch // 2) or waited >= self.admit_after_s

