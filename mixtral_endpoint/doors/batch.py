"""Batch scoring of JSONL files: one request per line, one result row per line, never a lost line.

Shared by the Azure batch-endpoint entry script (`batch_score.py`) and the local command
`mixtral-endpoint batch`. A line may carry an `id` next to `input_data` and `parameters`. Lines
are scored concurrently, so the engine batches them. A bad line (a 4xx of its own) becomes an error
row and never stops the others; a failure that is the server's (a dead or stalled engine, any 5xx, a
line that stays full) raises, so Azure ML retries the mini-batch and the local command stops where a
rerun resumes: no line that could be scored is written as an error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.errors import InvalidRequest, ScoringError, as_scoring_error
from mixtral_endpoint.protocol.validation import parse_json
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Line:
    file: str
    number: int  # 1-based line number in the file; 0 for a problem with the whole file
    text: str | None  # None: the file itself could not be read (see `problem`)
    problem: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.file, self.number


def read_lines(paths: Iterable[str]) -> Iterator[Line]:
    """Every non-blank line of every file; an unreadable or empty file yields one problem line."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                count = 0
                for number, text in enumerate(f, start=1):
                    if text.strip():
                        count += 1
                        yield Line(path, number, text)
        except (OSError, UnicodeDecodeError) as exc:
            yield Line(path, 0, None, f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}")
            continue
        if count == 0:
            yield Line(path, 0, None, f"{path} has no requests (the file is empty)")


def score_line(scorer: Scorer, line: Line) -> dict[str, Any]:
    """The result row of one line: the response, or the error that line got."""
    row: dict[str, Any] = {"file": line.file, "line": line.number, "id": None}
    try:
        if line.text is None:
            raise InvalidRequest(line.problem or "unreadable file")
        payload = parse_json(line.text)
        if isinstance(payload, dict) and "id" in payload:
            row["id"] = payload.pop("id")
        row["response"] = score_api.score_patiently(scorer, payload)
    except Exception as exc:
        error = as_scoring_error(exc, log, f"line {line.number} of {line.file}")
        if not _the_lines_fault(error):
            raise error from exc
        row["error"] = {**error.body()["error"], "status": error.status}
    return row


def _the_lines_fault(error: ScoringError) -> bool:
    """A 4xx the line earned (invalid, too long, flagged); not 429, which only says the server was full."""
    return error.status < 500 and error.status != 429


def default_workers(scorer: Scorer) -> int:
    """Lines in flight: enough to fill the batch and the queue behind it."""
    return scorer.line.limit


def score_lines(scorer: Scorer, lines: Iterable[Line], *, workers: int) -> Iterator[dict[str, Any]]:
    """Result rows in completion order, with at most `workers` lines in flight. The first failure that is
    not a line's own raises, after the lines not yet started are dropped."""
    with ThreadPoolExecutor(workers, thread_name_prefix="batch") as pool:
        pending: set[Future] = set()
        try:
            for line in lines:
                if len(pending) >= workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
                pending.add(pool.submit(score_line, scorer, line))
            for future in pending:
                yield future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def done_keys(output: Path) -> set[tuple[str, int]]:
    """The lines already in `output`, after cutting a last line that a kill left half-written."""
    if not output.exists():
        return set()
    with output.open("rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    return {(row["file"], row["line"]) for row in map(json.loads, data[:end].decode().splitlines())}


def run_local(scorer: Scorer, inputs: list[str], output: Path, *, workers: int, progress: bool = True) -> dict:
    """Scores `inputs` into `output`, skipping lines already there; returns rows/s and tokens/s."""
    from tqdm import tqdm

    done = done_keys(output)
    todo = [line for line in read_lines(inputs) if line.key not in done]
    started = time.perf_counter()
    rows = errors = tokens = 0
    with output.open("a", encoding="utf-8") as out, tqdm(total=len(todo), unit="row", disable=not progress) as bar:
        for row in score_lines(scorer, todo, workers=workers):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per row: whole or cut on resume
            out.flush()
            rows += 1
            errors += "error" in row
            tokens += _completion_tokens(row.get("response"))
            bar.update()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - started
    return {"rows": rows, "errors": errors, "skipped": len(done), "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 2) if seconds else 0.0,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0}




def _completion_tokens(response: Any) -> int:
    results = response if isinstance(response, list) else [response] if response else []
    return sum(r["usage"]["completion_tokens"] for r in results)
