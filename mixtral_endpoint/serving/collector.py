"""Azure ML model data collection: what each request asked and what it was answered, through
`azureml-ai-monitoring`, for model monitoring.

Off unless the deployment enables it (its YAML's `data_collector` block, which makes Azure configure the
collector; locally `AZUREML_MDC_ENABLED=true`, and `AZUREML_MDC_LOCAL_CAPTURE=true` logs what it would
send). The core collects once per scored request, from every door, as two collections, `model_inputs`
and `model_outputs`, each a one-row DataFrame correlated by the request's id (azmlinfsrv's
`x-request-id`). A request only hands its rows to a bounded queue (full: they are dropped, and logged);
a child process of ours builds the DataFrames and gives them to the SDK, whose own thread sends them. So
the collector's work holds none of the server's GIL (measured: in-process it cost the simulated GPU server
more than the 5% it may), and its failures and delays are logged and never fail or slow a request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue
from collections.abc import Sequence
from typing import Any

from mixtral_endpoint.protocol.request import Completion, ScoringRequest

log = logging.getLogger(__name__)

INPUTS, OUTPUTS = "model_inputs", "model_outputs"
_QUEUE_ROWS = 1000  # requests waiting to be collected; past it, dropped


class DataCollector:
    """The two collections, or nothing when the deployment has not enabled them."""

    def __init__(self) -> None:
        refusals: list[Exception] = []  # the SDK says "not enabled" through on_error while a collection is made
        try:
            from azureml.ai.monitoring import Collector

            # Made here only to ask the SDK whether the deployment enabled them; the child sends with its own.
            Collector(name=INPUTS, on_error=refusals.append)
            Collector(name=OUTPUTS, on_error=refusals.append)
        except Exception as exc:  # the SDK missing or broken: serve without it
            refusals.append(exc)
        self.enabled = not refusals
        if refusals:
            log.info("model data collection is off: %s", refusals[0])
            return
        log.info("model data collection is on: %s and %s, sent from a child process", INPUTS, OUTPUTS)
        context = multiprocessing.get_context("spawn")  # never fork a process that holds an engine
        self._queue = context.Queue(_QUEUE_ROWS)
        self._process = context.Process(target=_serve, args=(self._queue,), name="mixtral-data-collection",
                                        daemon=True)
        self._process.start()

    def collect(self, request_id: str, request: ScoringRequest, completions: Sequence[Completion]) -> None:
        """Queues the request's rows for collection; never raises, never waits."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait((request_id, _inputs(request), [_outputs(c) for c in completions]))
        except queue.Full:
            log.warning("model data collection is behind; request %r was not collected", request_id)


    def close(self) -> None:
        """Ends the child once it has handed what is queued to the SDK (it ends with the server anyway: a daemon)."""
        if not self.enabled or not self._process.is_alive():
            return
        with contextlib.suppress(ValueError, OSError):  # the queue already closed
            self._queue.put(None, timeout=1)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


def _serve(rows: multiprocessing.Queue) -> None:
    """The collecting process: the SDK's two collections, fed from the server's queue until it goes away.
    It runs at the lowest CPU priority: off every request's path, it takes only the CPU that serving leaves."""
    os.nice(19)
    import pandas as pd
    from azureml.ai.monitoring import Collector
    from azureml.ai.monitoring.context import BasicCorrelationContext

    def dropped(error: Exception) -> None:
        log.warning("model data collection dropped a row: %s", error)

    inputs, outputs = Collector(name=INPUTS, on_error=dropped), Collector(name=OUTPUTS, on_error=dropped)
    while True:
        try:
            item = rows.get()
        except (EOFError, OSError):  # the server process has ended
            return
        if item is None:  # the scorer closed
            return
        request_id, asked, answered = item
        try:
            context = BasicCorrelationContext(id=request_id)
            inputs.collect(pd.DataFrame([asked]), context)
            outputs.collect(pd.DataFrame(answered), context)
        except Exception as exc:  # never the request's failure
            log.warning("model data collection failed for request %r: %s", request_id, exc)


def _inputs(request: ScoringRequest) -> dict[str, Any]:
    settings = {k: v for k, v in vars(request.settings).items() if k != "constraint"}
    if request.settings.constraint is not None:
        settings["constraint"] = request.settings.constraint.kind
    prompt = ([{"role": m.role, "content": m.content} for m in request.conversation]
              if request.conversation is not None else list(request.prompts or ()))
    return {"input_string": json.dumps(prompt, ensure_ascii=False), "parameters": json.dumps(settings)}


def _outputs(completion: Completion) -> dict[str, Any]:
    return {"output": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": len(completion.prompt_token_ids), "completion_tokens": len(completion.token_ids)}
