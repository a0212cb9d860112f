"""What operating the endpoint costs: metrics scraped, model data collection and content screening on,
against the same server with them off, in one run.

    .venv/bin/python bench/operations.py [--model tiny|medium] [--callers 8] [--new-tokens 32] [--requests 6]
                                         [--repeat 5] [--parts metrics,collection,screening]

Two azmlinfsrv servers on the embedded model, both loaded, driven in turn, round after round (the phases
alternate, so the drift of a shared machine falls on both alike); each figure is the median of --repeat:
- plain: no collection, no screening; metrics are kept (they always are) and nobody scrapes them;
- operated: data collection on, the SDK sending every row over HTTP to a local sink standing in for
  Azure's collector sidecar; every prompt and answer screened by a local server that speaks Content
  Safety's `text:analyze`; `/metrics` scraped every second.
The callers post /score conversations; the ratio is the operated server's throughput over the plain one's.
The sink and the screening server run in a process of their own (in Azure neither shares the callers' GIL);
the screening server answers at once: the service's own latency (a round trip to Azure) comes on top.
Also printed: the CPU each server spent per request, in its own process and in its helpers (the screening
and collecting children), which on a GPU machine run on cores the server does not use.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engines import build_checkpoint  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from tests.fake_content_safety import FakeContentSafety  # noqa: E402
from tests.localserver import LocalServer  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "In 1969, the first", "Mixture of experts models",
           "def fibonacci(n):", "Dear hiring manager,", "The recipe calls for", "Azure Machine Learning"]


class Sink:
    """Answers 200 to every POST: Azure ML's data collector sidecar, as far as the SDK can tell."""

    def __init__(self) -> None:
        self.rows = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.rows += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()


def _serve_stand_ins(conn: Connection) -> None:
    """The stand-ins' process: answers each message on `conn` with the counts so far, until it is sent None."""
    sink, screen = Sink(), FakeContentSafety()
    conn.send((sink.port, screen.url))
    while conn.recv() is not None:
        conn.send((sink.rows, len(screen.calls)))
    screen.close()


class StandIns:
    """Azure's collector sidecar and the Content Safety service, stood in for by a Sink and a FakeContentSafety
    in a process of their own: in this one they would hold the callers' GIL, which neither does in Azure."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve_stand_ins, args=(theirs,), name="stand-ins", daemon=True)
        self.process.start()
        sink_port, screen_url = self._conn.recv()
        self.env = {"AZUREML_MDC_ENABLED": "true", "AZUREML_MDC_HOST": "127.0.0.1", "AZUREML_MDC_PORT": str(sink_port),
                    "CONTENT_SAFETY_ENDPOINT": screen_url, "CONTENT_SAFETY_KEY": "bench"}

    def counts(self) -> tuple[int, int]:
        """Rows the sink received, texts the screening server was sent."""
        self._conn.send("counts")
        return self._conn.recv()

    def settled_counts(self, patience_s: float = 30) -> tuple[int, int]:
        """The counts once a second has passed without a row: what a collector still catching up sent by then."""
        counts, deadline = self.counts(), time.monotonic() + patience_s
        while time.monotonic() < deadline:
            time.sleep(1)
            counts, last = self.counts(), counts
            if counts == last:
                break
        return counts

    def close(self) -> None:
        self._conn.send(None)
        self.process.join(10)


@contextlib.contextmanager
def operations_env() -> Iterator[StandIns]:
    """The stand-ins whose `env` turns on data collection (to the sink) and screening (by the local server)."""
    stand_ins = StandIns()
    try:
        yield stand_ins
    finally:
        stand_ins.close()


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of a server's processes: the door (gunicorn's, or `vllm serve`'s API server), vLLM's
    engine processes (its engine core and executor workers, which name themselves VLLM::), and helpers (our
    screening and collecting processes, multiprocessing's resource tracker)."""
    spent = {"door": 0.0, "engine": 0.0, "helpers": 0.0}
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            part = ("engine" if process.name().startswith("VLLM::") else
                    "helpers" if "multiprocessing" in " ".join(process.cmdline()) else "door")
            spent[part] += times.user + times.system
    return spent


def phase(url: str, callers: int, per_caller: int, new_tokens: int) -> float:
    """Completion tokens per second of `callers` callers, each posting per_caller conversations in turn."""
    def caller(index: int) -> int:
        tokens = 0
        for i in range(per_caller):
            body = {"input_data": {"input_string": [{"role": "user", "content": PROMPTS[(index + i) % len(PROMPTS)]}]},
                    "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}
            response = requests.post(url + "/score", json=body, timeout=120)
            assert response.status_code == 200, response.text
            tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        tokens = sum(pool.map(caller, range(callers)))
    return tokens / (time.perf_counter() - start)


def scrape(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        requests.get(url + "/metrics", timeout=30).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=6, help="per caller, per phase")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parts", default="metrics,collection,screening", help="what the operated server runs")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    base = {"MIXTRAL_MAX_BATCH_SIZE": str(args.callers), "MIXTRAL_MAX_QUEUE": str(4 * args.callers)}
    with tempfile.TemporaryDirectory() as tmp, operations_env() as stand_ins:
        model = package_model(build_checkpoint(args.model, Path(tmp) / args.model), Path(tmp) / "model")
        chosen = {k: v for k, v in stand_ins.env.items()
                  if ("collection" in parts or "MDC" not in k) and ("screening" in parts or "SAFETY" not in k)}
        threads = 3 * args.callers
        with LocalServer(model, Path(tmp) / "plain.log", base, threads=threads) as plain, \
                LocalServer(model, Path(tmp) / "operated.log", {**base, **chosen}, threads=threads) as operated:
            stop = threading.Event()
            if "metrics" in parts:
                threading.Thread(target=scrape, args=(operated.url, stop), daemon=True).start()
            for server in (plain, operated):
                phase(server.url, args.callers, 1, args.new_tokens)  # warm
            rates: dict[str, list[float]] = {"plain": [], "operated": []}
            cpu = {name: {"door": 0.0, "engine": 0.0, "helpers": 0.0} for name in rates}
            for round_ in range(args.repeat):
                order = (("plain", plain), ("operated", operated))
                for name, server in order if round_ % 2 == 0 else order[::-1]:
                    before = cpu_seconds(server.process.pid)
                    rates[name].append(phase(server.url, args.callers, args.requests, args.new_tokens))
                    for part, seconds in cpu_seconds(server.process.pid).items():
                        cpu[name][part] += seconds - before[part]
            stop.set()
            collected, screened = stand_ins.settled_counts()
            log = (Path(tmp) / "operated.log").read_text()
    plain_rate, operated_rate = (statistics.median(rates[k]) for k in ("plain", "operated"))
    requests_made = args.repeat * args.callers * args.requests
    per_request = {name: {"server": f"{1000 * (spent['door'] + spent['engine']) / requests_made:.2f}",
                          "helpers": f"{1000 * spent['helpers'] / requests_made:.2f}"} for name, spent in cpu.items()}
    print(f"model={args.model} callers={args.callers} new_tokens={args.new_tokens} "
          f"requests/caller={args.requests} rounds={args.repeat}")
    print(f"plain    {plain_rate:8.1f} tok/s")
    print(f"operated {operated_rate:8.1f} tok/s  ({', '.join(sorted(parts))})  "
          f"ratio {operated_rate / plain_rate:.2f}")
    print("CPU ms per request, the server's process / its helpers:",
          "; ".join(f"{name} {spent['server']} / {spent['helpers']}" for name, spent in per_request.items()))
    print(f"rows collected: {collected}; texts screened: {screened}; rows dropped: {log.count('was not collected')}; "
          f"collection or screening errors logged: "
          f"{log.count('model data collection failed') + log.count('content screening failed')}")


if __name__ == "__main__":
    main()
