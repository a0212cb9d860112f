"""Prometheus metrics in vLLM's names, types, labels and buckets (vLLM 0.32's `v1/metrics/loggers.py` and
`buckets.py`), kept by the core so both engines report alike and vLLM's Grafana dashboards read them.

A row is what vLLM calls a request: each prompt of a /score request counts once. With one gunicorn worker, one
in-process registry holds every count. With several (one engine replica each: serving/replicas.py), `GET /metrics`
reaches whichever worker accepted the scrape, so each worker's values live in prometheus_client's multiprocess files
(`shared=`, one folder per server start) and a scrape of any worker shows every replica, each under its own `engine`
label (vLLM's, the replica's index), which `sum(...)` adds up to the instance.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from mixtral_endpoint.engines.engine import Row
from mixtral_endpoint.protocol.errors import STATUS, ModelNotReady, Overloaded, ScoringError
from mixtral_endpoint.serving.line import Line

LABELS = ("model_name", "engine")  # vLLM's; engine is its engine index, "0" for one engine
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                               20.0, 40.0, 80.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's finished_reason values (stop, length, abort, error), then ours (record()).
FINISHED_REASONS = ("stop", "length", "abort", "error", "time_limit", "content_filter")
REFRESH_S = 1.0  # with replicas: how often a worker writes its line's gauges for the other workers' scrapes
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 series up to the window: 1, 2, 5, 10, 20, 50, ..."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(float(mantissa * scale))
        scale *= 10


class Metrics:
    """The core's metrics. `engine` is the replica's index; `shared`, with several replicas, the folder every worker
    of this server keeps its values in (prometheus_client's multiprocess mode)."""

    def __init__(self, line: Line, *, model_name: str, max_model_len: int, engine: str = "0",
                 shared: Path | None = None) -> None:
        with _values_in(shared):
            self._build(line, model_name=model_name, max_model_len=max_model_len, engine=engine)
        self.shared = shared
        if shared is None:
            self._scrape = self.registry  # in-process: what this worker counts is all there is
            return
        # Gauges read by a function exist only in the process that reads them: a worker writes its own instead,
        # every REFRESH_S and at its own scrapes, and a dead worker's disappear ("live" modes, _forget_the_dead).
        self._line = line
        self._scrape = CollectorRegistry()
        multiprocess.MultiProcessCollector(self._scrape, path=str(shared))
        line.engine.on_death.append(lambda error: self._refresh())
        self.refresh_thread = threading.Thread(target=self._keep_refreshing, name="mixtral-metrics", daemon=True)
        self.refresh_thread.start()

    def _build(self, line: Line, *, model_name: str, max_model_len: int, engine: str) -> None:
        self.registry = CollectorRegistry()
        values = {"model_name": model_name, "engine": engine}

        def make(kind, name, documentation, **kwargs):
            return kind(name, documentation, [*LABELS, *kwargs.pop("extra", ())], registry=self.registry, **kwargs)

        # With replicas each engine's gauge is its live worker's (a dead worker's goes with it); in-process the
        # mode is ignored.
        self._running = make(Gauge, "vllm:num_requests_running", "Number of requests in model execution batches.",
                             multiprocess_mode="livesum").labels(**values)
        self._waiting = make(Gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             multiprocess_mode="livesum").labels(**values)
        self._usage = make(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                           multiprocess_mode="livemax").labels(**values)
        self._running.set_function(lambda: line.counts[0])
        self._waiting.set_function(lambda: line.counts[1])
        self._usage.set_function(lambda: _kv_usage(line))
        self.prompt_tokens = make(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.").labels(**values)
        self.generation_tokens = make(Counter, "vllm:generation_tokens",
                                      "Number of generation tokens processed.").labels(**values)
        self._success = make(Counter, "vllm:request_success", "Count of successfully processed requests.",
                             extra=("finished_reason",))
        # As vLLM does, every reason from the start: a rate counts the first row of each reason too.
        self._success_by_reason = {reason: self._success.labels(**values, finished_reason=reason)
                                   for reason in FINISHED_REASONS}
        self._values = values
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = make(Histogram, "vllm:request_prompt_tokens",
                                          "Number of prefill tokens processed.", buckets=tokens).labels(**values)
        self.request_generation_tokens = make(Histogram, "vllm:request_generation_tokens",
                                              "Number of generation tokens processed.", buckets=tokens).labels(**values)
        self.time_to_first_token = make(Histogram, "vllm:time_to_first_token_seconds",
                                        "Histogram of time to first token in seconds.",
                                        buckets=TIME_TO_FIRST_TOKEN_BUCKETS).labels(**values)
        self.inter_token_latency = make(Histogram, "vllm:inter_token_latency_seconds",
                                        "Histogram of inter-token latency in seconds.",
                                        buckets=INTER_TOKEN_LATENCY_BUCKETS).labels(**values)
        self.e2e_latency = make(Histogram, "vllm:e2e_request_latency_seconds",
                                "Histogram of e2e request latency in seconds.",
                                buckets=REQUEST_LATENCY_BUCKETS).labels(**values)
        self.queue_time = make(Histogram, "vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               buckets=REQUEST_LATENCY_BUCKETS).labels(**values)
        self.prefill_time = make(Histogram, "vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.",
                                 buckets=REQUEST_LATENCY_BUCKETS).labels(**values)
        self.decode_time = make(Histogram, "vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.",
                                buckets=REQUEST_LATENCY_BUCKETS).labels(**values)
        # vLLM's: the most tokens any of a request's n sequences generated; a row is one sequence (n = 1).
        self.max_num_generation_tokens = make(Histogram, "vllm:request_max_num_generation_tokens",
                                              "Histogram of maximum number of requested generation tokens.",
                                              buckets=tokens).labels(**values)
        # Ours, beside vLLM's (observability/: the dashboard and alert rules that read them).
        self._healthy = make(Gauge, "mixtral:engine_healthy",
                             "1 while the engine can serve; 0 once it died or stalled (its worker is being replaced).",
                             multiprocess_mode="livemax").labels(**values)
        self._healthy.set_function(lambda: _healthy(line))
        make(Gauge, "mixtral:engine_start_time_seconds",
             "Unix time this process's engine started serving: a new value is a fresh worker after a death.",
             multiprocess_mode="livemax").labels(**values).set(time.time())
        make(Gauge, "mixtral:max_num_requests_running", "Rows the engine's batch holds at most.",
             multiprocess_mode="livemax").labels(**values).set(line.capacity.rows)
        make(Gauge, "mixtral:max_num_requests_waiting",
             "Rows the line lets wait at most (MIXTRAL_MAX_QUEUE); past it, 429.",
             multiprocess_mode="livemax").labels(**values).set(line.max_queue)
        self._refused = make(Counter, "mixtral:requests_refused",
                             "Requests refused whole before any row ran: 429 overloaded (the line is full), "
                             "503 model_not_ready (the engine died or is closing).", extra=("code", "status"))
        for error in (Overloaded, ModelNotReady):  # both series from the start, at 0, so a rate has data
            self._refused.labels(**values, code=error.code, status=str(STATUS[error.code]))

    def refused(self, error: ScoringError) -> None:
        """A request the core refused whole, before any of its rows ran (the line full, the engine dead).
        Counted once per request, not per row: none of its rows was admitted."""
        with _values_in(self.shared):  # a label set not seen before gets its value here
            child = self._refused.labels(**self._values, code=error.code, status=str(error.status))
        child.inc()

    def record(self, rows: Sequence[Row], token_counts: Sequence[int], finish_reasons: Sequence[str],
               now: float) -> None:
        """Rows that have ended, with the tokens their callers got and why each ended (vLLM's
        finished_reason: stop, length, abort, error (the server failed the request: a 5xx); ours adds
        time_limit and content_filter)."""
        for row, tokens, reason in zip(rows, token_counts, finish_reasons, strict=True):
            self.prompt_tokens.inc(len(row.prompt))
            self.generation_tokens.inc(tokens)
            success = self._success_by_reason.get(reason)
            if success is None:
                with _values_in(self.shared):
                    success = self._success.labels(**self._values, finished_reason=reason)
            success.inc()
            self.request_prompt_tokens.observe(len(row.prompt))
            self.request_generation_tokens.observe(tokens)
            self.max_num_generation_tokens.observe(tokens)
            self.e2e_latency.observe(now - row.submitted_at)
            started = row.started_at or now
            self.queue_time.observe(started - row.submitted_at)
            if row.first_token_at is not None:
                self.time_to_first_token.observe(row.first_token_at - row.submitted_at)
                # vLLM's phases: from being scheduled to the first token, then to the last.
                self.prefill_time.observe(row.first_token_at - started)
                self.decode_time.observe((row.last_token_at or row.first_token_at) - row.first_token_at)
                if tokens > 1 and row.last_token_at is not None:
                    # The mean gap, once per gap: the histogram's sum and count are exact, its spread is not.
                    gap = (row.last_token_at - row.first_token_at) / (tokens - 1)
                    _observe_times(self.inter_token_latency, gap, tokens - 1)

    def exposition(self) -> bytes:
        """The scrape: this worker's registry, or with replicas every live worker's values and every worker's
        counts (a dead worker's counters stay: its replica's totals go on from them)."""
        if self.shared is not None:
            self._refresh()
            _forget_the_dead(self.shared)
        return generate_latest(self._scrape)

    def _refresh(self) -> None:
        """Writes the line's gauges, which only this worker can read, for every worker's scrape."""
        running, waiting, _ = self._line.counts
        self._running.set(running)
        self._waiting.set(waiting)
        self._usage.set(_kv_usage(self._line))
        self._healthy.set(_healthy(self._line))

    def _keep_refreshing(self) -> None:
        while True:
            self._refresh()
            time.sleep(REFRESH_S)


def _observe_times(histogram: Histogram, amount: float, times: int) -> None:
    """`histogram.observe(amount)` `times` times, in one step (256 rows of 128 tokens ending at one step made
    32,512 calls). prometheus_client 0.26's own fields, as its observe() updates them; the version is pinned
    and tests/test_metrics.py checks the counts."""
    histogram._sum.inc(amount * times)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(times)
            break


@contextlib.contextmanager
def _values_in(shared: Path | None) -> Iterator[None]:
    """Metrics made inside keep their values in `shared`'s files (None: in this process, as by default).

    prometheus_client picks its value class once, at import, from PROMETHEUS_MULTIPROC_DIR, and a file's folder
    from the same variable when a value is made. Both are set here only while ours are made: vLLM's metrics and the
    children this worker starts keep the default, and no other library's series join the scrape."""
    if shared is None:
        yield
        return
    with _switch:
        saved_class, saved_folder = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = _file_values()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
        try:
            yield
        finally:
            values.ValueClass = saved_class
            if saved_folder is None:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved_folder


_switch = threading.Lock()


@functools.cache
def _file_values() -> type:
    """One multiprocess value class per process: each holds its files open, and two over one file would write
    over each other."""
    return values.MultiProcessValue()


def _forget_the_dead(shared: Path) -> None:
    """Removes the live gauges of workers that have exited (gunicorn's master would, with a child_exit hook that
    azmlinfsrv does not let us add)."""
    for path in shared.glob("gauge_live*.db"):
        found = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if found and not _alive(int(found.group(1))):
            multiprocess.mark_process_dead(int(found.group(1)), str(shared))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(line: Line) -> float:
    # A stand-in engine without `dead` (a test's) counts as healthy.
    return float(getattr(line.engine, "dead", None) is None)


def _kv_usage(line: Line) -> float:
    """The share of the cache reserved: on vLLM its tokens; on our engine rows, each holding a whole window."""
    running, _, reserved = line.counts
    if line.capacity.kv_tokens:
        return reserved / line.capacity.kv_tokens
    return running / line.capacity.rows
