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
The screening server answers at once: the service's own latency (a round trip to Azure) comes on top.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engines import build_checkpoint  # noqa: E402

from mixtral_endpoint.localserver import LocalServer  # noqa: E402
from mixtral_endpoint.packaging import package_model  # noqa: E402
from tests.fake_content_safety import FakeContentSafety  # noqa: E402

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


@contextlib.contextmanager
def operations_env() -> Iterator[tuple[dict[str, str], Sink, FakeContentSafety]]:
    """The environment that turns on data collection (to a local sink) and screening (by a local server)."""
    sink, screen = Sink(), FakeContentSafety()
    try:
        yield ({"AZUREML_MDC_ENABLED": "true", "AZUREML_MDC_HOST": "127.0.0.1", "AZUREML_MDC_PORT": str(sink.port),
                "CONTENT_SAFETY_ENDPOINT": screen.url, "CONTENT_SAFETY_KEY": "bench"}, sink, screen)
    finally:
        screen.close()


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
    with tempfile.TemporaryDirectory() as tmp, operations_env() as (operated_env, sink, screen):
        model = package_model(build_checkpoint(args.model, Path(tmp) / args.model), Path(tmp) / "model")
        chosen = {k: v for k, v in operated_env.items()
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
            for round_ in range(args.repeat):
                order = (("plain", plain), ("operated", operated))
                for name, server in order if round_ % 2 == 0 else order[::-1]:
                    rates[name].append(phase(server.url, args.callers, args.requests, args.new_tokens))
            stop.set()
            log = (Path(tmp) / "operated.log").read_text()
            collected, screened = sink.rows, len(screen.calls)
    plain_rate, operated_rate = (statistics.median(rates[k]) for k in ("plain", "operated"))
    print(f"model={args.model} callers={args.callers} new_tokens={args.new_tokens} "
          f"requests/caller={args.requests} rounds={args.repeat}")
    print(f"plain    {plain_rate:8.1f} tok/s")
    print(f"operated {operated_rate:8.1f} tok/s  ({', '.join(sorted(parts))})  "
          f"ratio {operated_rate / plain_rate:.2f}")
    print(f"rows collected: {collected}; texts screened: {screened}; collection or screening errors logged: "
          f"{log.count('model data collection failed') + log.count('content screening failed')}")


if __name__ == "__main__":
    main()
