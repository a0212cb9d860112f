"""Optional screening of prompts and answers with Azure AI Content Safety, and Mistral's guardrail prompt.

Mixtral "does not have any moderation mechanisms" (its model card). As Azure's catalog container does when
`CONTENT_SAFETY_ENDPOINT` is set, every prompt and every answer is screened for Hate, SelfHarm, Sexual and
Violence, in chunks of 1000 characters; a category whose severity is over the threshold (default 2: the
medium and high levels, as Azure's default filter) flags the text. A flagged prompt is a 400 with code
`content_filter`; a flagged answer ends with `finish_reason: content_filter`, its flagged text withheld. A
stream is screened as it goes: its text is released window by window, each once screened, so a flag
mid-stream ends it without sending the flagged window (windows start at 200 characters, so the first text
comes soon, and double up to the 1000 of a chunk, so a long answer costs few calls). When screening
itself fails, the setting decides: fail closed (a 503 for a prompt, `content_filter` for an answer) or
fail open (logged, and served). The client runs in a child process (`Screen`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Final, TypeAlias

from mixtral_endpoint.protocol.errors import ContentFiltered, ModelNotReady, Overloaded
from mixtral_endpoint.protocol.request import Message

if TYPE_CHECKING:
    from azure.ai.contentsafety import ContentSafetyClient

log = logging.getLogger(__name__)

CATEGORIES: Final = ("Hate", "SelfHarm", "Sexual", "Violence")
CHUNK_CHARS: Final = 1000  # the catalog container's chunk; the service takes up to 10k characters a call
STREAM_WINDOW_CHARS: Final = 200  # a stream's first screened window; each next one is twice as long, up to a chunk
# Mistral's `safe_prompt`: this system prompt goes before the conversation.
GUARDRAIL: Final = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid "
                    "harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and "
                    "positivity.")
_RETRY_AFTER_S = 5
_CONCURRENT_CALLS = 10  # the calls the child makes at once: as many as `requests` keeps connections to a host
# Calls waiting for an answer at most before a new prompt is refused (429): past it the backlog would outlast a
# verdict's wait, and with fail-open set every prompt would then be served unscreened.
MAX_BACKLOG_CALLS = 256
_START_S = 60  # for a child to import the client and make it

# A chunk's answer from the child: its (category, severity) pairs, or why there are none.
Answer: TypeAlias = list[tuple[str, "int | None"]] | str


def with_guardrail(conversation: Sequence[Message]) -> tuple[Message, ...]:
    """The conversation with Mistral's guardrail prompt as its system message (before any of its own)."""
    if conversation and conversation[0].role == "system":
        return (Message("system", f"{GUARDRAIL}\n\n{conversation[0].content}"), *conversation[1:])
    return (Message("system", GUARDRAIL), *conversation)


class Screen:
    """Azure AI Content Safety, called from a child process of ours, and the rules for what its answers mean.

    The client costs 1.2-1.9 ms of CPU a call in azure-core and `requests` (measured against the local
    stub), two calls or more a request; in the server's process that is GIL time the door and the engine's
    loop need. So a child process makes the calls, `_CONCURRENT_CALLS` at a time, and the server only
    passes it each chunk and waits (about 0.2 ms of its CPU a call). A child that dies is replaced: the
    calls it held fail (as the setting says), later ones go on.
    """

    def __init__(self, endpoint: str, *, threshold: int, fail_open: bool, key: str = "",
                 timeout_s: float = 10.0, max_backlog: int = MAX_BACKLOG_CALLS) -> None:
        self.threshold = threshold
        self.fail_open = fail_open
        self.max_backlog = max_backlog
        self._client_args = (endpoint, key, timeout_s)
        self.wait_s = 4 * timeout_s  # two tries of a connect and a read: past it the child is hung
        self._lock = threading.Lock()  # the pipe's sending end, the calls waiting and the child
        self._waiting: dict[int, Future[Answer]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._process, self._calls = self._start()  # a child that cannot make a client fails init() here
        threading.Thread(target=self._read_answers, name="mixtral-screening-answers", daemon=True).start()

    def start(self, text: str) -> Verdict:
        """Sends `text` to be screened, its chunks at once (one round trip, not one per chunk); the verdict
        is read when wanted, so the caller can go on meanwhile."""
        return Verdict(self, [self._call(text[start:start + CHUNK_CHARS])
                              for start in range(0, len(text), CHUNK_CHARS)])

    def start_prompt(self, text: str) -> Verdict:
        """`start` for a prompt, new work: refused with Overloaded (429) while the calls waiting for an answer
        are at the backlog's bound, so a flood sheds load instead of timing every verdict out."""
        with self._lock:
            backlog = len(self._waiting)
        if backlog + -(-len(text) // CHUNK_CHARS) > self.max_backlog:
            raise Overloaded(f"content screening has {backlog} calls waiting; retry in {_RETRY_AFTER_S} s",
                             retry_after=_RETRY_AFTER_S)
        return self.start(text)

    def flagged(self, text: str) -> str | None:
        """The first category over the threshold in any chunk of `text`, or None; raises ScreeningFailed."""
        return self.start(text).category()

    def close(self) -> None:
        """Ends the child (it ends with the server anyway: a daemon)."""
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):  # it may have gone already
                self._calls.send(None)  # the child returns, and the reader sees the pipe end
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()

    def _call(self, chunk: str) -> tuple[int, Future[Answer]]:
        answer: Future[Answer] = Future()
        with self._lock:
            call_id = next(self._ids)
            self._waiting[call_id] = answer
            try:
                self._calls.send((call_id, chunk))
            except OSError as exc:  # the child has gone; the reader is starting another
                del self._waiting[call_id]
                answer.set_result(f"the screening process has gone ({exc})")
        return call_id, answer

    def _forget(self, call_id: int) -> None:
        """A call given up on (a hung child): its answer, should it come, goes nowhere."""
        with self._lock:
            self._waiting.pop(call_id, None)

    def _start(self) -> tuple[BaseProcess, Connection]:
        context = multiprocessing.get_context("spawn")  # never fork a process that holds an engine
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs, *self._client_args), name="mixtral-screening",
                                  daemon=True)
        process.start()
        theirs.close()
        if not ours.poll(_START_S):
            process.kill()
            raise RuntimeError(f"the content screening process did not start in {_START_S} s")
        _, failure = ours.recv()
        if failure is not None:
            raise RuntimeError(f"the content screening process could not make its client: {failure}")
        return process, ours

    def _read_answers(self) -> None:
        while True:
            try:
                call_id, severities = self._calls.recv()
            except (EOFError, OSError):  # the child died, or returned on close()
                if self._closed or not self._restart():
                    self._calls.close()
                    return
                continue
            with self._lock:
                answer = self._waiting.pop(call_id, None)
            if answer is not None:
                answer.set_result(severities)

    def _restart(self) -> bool:
        """Fails the calls the dead child held and starts another; False once closed."""
        self._process.join(timeout=1)
        log.error("the content screening process ended (exit code %s); starting another", self._process.exitcode)
        with self._lock:
            for answer in self._waiting.values():
                answer.set_result("the screening process ended")
            self._waiting.clear()
        while not self._closed:
            try:
                process, calls = self._start()
            except (OSError, RuntimeError) as exc:
                log.error("%s; trying again in %s s", exc, _RETRY_AFTER_S)
                time.sleep(_RETRY_AFTER_S)
                continue
            with self._lock:
                self._calls.close()
                self._process, self._calls = process, calls
                if not self._closed:
                    return True
            self.close()
        return False


class Verdict:
    """One text's screening under way, and what its answers mean under the screen's rules."""

    def __init__(self, screen: Screen, calls: list[tuple[int, Future[Answer]]]) -> None:
        self._screen = screen
        self._calls = calls

    def category(self) -> str | None:
        """The first category over the threshold in any chunk, or None; raises ScreeningFailed."""
        try:
            return self._category()
        finally:  # calls not answered by now (a hung child, or not needed once one chunk decided) are dropped
            for call_id, answer in self._calls:
                if not answer.done():
                    self._screen._forget(call_id)

    def _category(self) -> str | None:
        screen = self._screen
        deadline = time.monotonic() + screen.wait_s
        for _, answer in self._calls:
            try:
                severities = answer.result(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                severities = f"no answer in {screen.wait_s:.0f} s"
            if isinstance(severities, str):  # the service, the network, the credential or the child
                log.error("content screening failed (%s): %s",
                          "served anyway: fail open" if screen.fail_open else "fail closed", severities)
                if screen.fail_open:
                    return None
                raise ScreeningFailed("content screening is unavailable; retry shortly",
                                      retry_after=_RETRY_AFTER_S) from None
            for category, severity in severities:
                if (severity or 0) > screen.threshold:
                    return category
        return None

    def check_prompt(self, param: str) -> None:
        """Raises ContentFiltered naming the category when the text, a prompt, is flagged."""
        category = self.category()
        if category is not None:
            raise ContentFiltered(f"the request input was flagged by Azure AI Content Safety: {category}",
                                  param=param)

    def answer_flagged(self) -> bool:
        """An answer is withheld when flagged, and when screening fails closed."""
        try:
            return self.category() is not None
        except ScreeningFailed:
            return True


class ScreeningFailed(ModelNotReady):
    """Screening was unavailable and the server fails closed: a 503 with Retry-After."""


def _serve(calls: Connection, endpoint: str, key: str, timeout_s: float) -> None:
    """The screening process: each chunk the server sends, analysed on one of a few threads; its answer
    is the (category, severity) pairs, or a string saying why there are none."""
    try:
        client = _client(endpoint, key, timeout_s)
    except Exception as exc:  # noqa: BLE001 (the server says it and fails init)
        calls.send((None, f"{type(exc).__name__}: {exc}"))
        return
    calls.send((None, None))
    sending = threading.Lock()

    def analyse(call_id: int, chunk: str) -> None:
        try:
            body = json.dumps({"text": chunk, "categories": CATEGORIES, "outputType": "FourSeverityLevels"})
            # As bytes, streamed back: the client's model classes would cost as much CPU as the call.
            result = json.loads(b"".join(client.analyze_text(body.encode(), stream=True)))
            answer: Answer = [(a["category"], a.get("severity")) for a in result["categoriesAnalysis"]]
        except Exception as exc:  # noqa: BLE001 (the server logs it and fails open or closed)
            answer = f"{type(exc).__name__}: {exc}"
        with sending:
            calls.send((call_id, answer))

    with ThreadPoolExecutor(_CONCURRENT_CALLS, thread_name_prefix="screen") as pool:
        while True:
            try:
                call = calls.recv()
            except (EOFError, OSError):  # the server process has ended
                return
            if call is None:  # the server closed the screen
                return
            pool.submit(analyse, *call)


def _client(endpoint: str, key: str, timeout_s: float) -> ContentSafetyClient:
    from azure.ai.contentsafety import ContentSafetyClient

    if key:
        from azure.core.credentials import AzureKeyCredential

        credential = AzureKeyCredential(key)
    else:  # the deployment's managed identity (the role "Cognitive Services User" on the resource)
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    # The proxy and CA bundle the environment gives this endpoint, read once: `requests` would read the whole
    # environment again on every call (a fifth of the client's CPU a call, profiled).
    from requests.utils import get_environ_proxies

    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return ContentSafetyClient(endpoint, credential, connection_timeout=timeout_s, read_timeout=timeout_s,
                               retry_total=1, use_env_settings=False, proxies=get_environ_proxies(endpoint) or None,
                               **({"connection_verify": bundle} if bundle else {}))
