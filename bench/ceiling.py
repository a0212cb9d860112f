"""The door and core's ceiling: how much of a GPU engine's throughput reaches the callers.

    .venv/bin/python bench/ceiling.py [--callers 64 256] [--requests 4] [--new-tokens 128] [--operations] [--metrics]
                                      [--replicas 2]

A real azmlinfsrv, under deployment.yml's own environment (its threads, batch, queue and vLLM
settings), serves the embedded model on its vLLM engine, with vLLM's LLMEngine replaced by a
stand-in that steps in 20 ms + 0.06 ms per row (a bf16 Mixtral decode step on one H200, reading all
93 GB of weights; bench/simulated_vllm.py). N callers each send --requests /score requests of
--new-tokens tokens back to back, streamed and not, from one asyncio client in this process.

The baseline, measured in the same run: the stand-in stepped alone with N rows, as many steps as
the callers' tokens take. Printed: the share of that throughput the callers got.

With --operations a second server runs beside the first, the same but with what an operator turns on
(bench/operations.py: /metrics scraped every second from a process of its own, model data collection to a local
sink, every prompt and answer screened by a local text:analyze server); the two are driven in turn and its throughput is
printed over the plain server's: what operating the endpoint costs at GPU scale.

With --replicas N the server runs N engine replicas, one gunicorn worker each, under the 8-GPU deployment files'
gunicorn flags (deployments/nd96amsr-a100.yml: connections capped at a replica's threads, ReplicaWorker), each
replica its own stand-in; the baseline is N stand-ins, each stepping its share of the callers: whether an instance
of several replicas delivers the sum of theirs.

With --metrics a second server (or a third, beside --operations) runs with the metrics path alone: /metrics
scraped every second, and the deployment's Application Insights on (`app_insights_enabled`: azmlinfsrv's
AML_APP_INSIGHTS_ENABLED and an instrumentation key), so the metrics also go to Azure Monitor at the product's
default interval (OTEL_METRIC_EXPORT_INTERVAL unset: 60 s, serving/azure_monitor.py), and azmlinfsrv's request
traces and our per-request lines to Application Insights' logs. The connection string names a local port
nothing listens on: every export fails at once, and the exporters keep their envelopes on disk to retry, as
they would while Azure is out of reach. Its throughput over the plain server's is printed the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operations import cpu_seconds, operations_env, scrape  # noqa: E402
from simulated_vllm import SimulatedLLM  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny  # noqa: E402
from mixtral_endpoint.serving.azure_monitor import DEFAULT_EXPORT_INTERVAL_MS  # noqa: E402
from tests.localserver import LocalServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEP_MS, ROW_MS = 20.0, 0.06
USAGE = re.compile(rb'"completion_tokens": (\d+)')


async def call(port: int, body: bytes) -> int:
    """One /score request over a fresh connection; the completion tokens its usage reports."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /score HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    received = bytearray()
    while chunk := await reader.read(65536):  # streamed events are read as they come
        received += chunk
    writer.close()
    if not received.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(received[:300].decode(errors="replace"))
    return int(USAGE.findall(bytes(received))[-1])


async def crowd(port: int, callers: int, requests: int, new_tokens: int, stream: bool) -> tuple[int, float]:
    body = json.dumps({"input_data": {"input_string": ["The capital of France is"]},
                       "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True, "stream": stream}}).encode()

    async def caller() -> int:
        return sum([await call(port, body) for _ in range(requests)])

    start = time.perf_counter()
    tokens = await asyncio.gather(*(caller() for _ in range(callers)))
    return sum(tokens), time.perf_counter() - start


def engine_alone(rows: int, steps: int) -> float:
    """Tokens per second of the stand-in stepping `rows` rows with nothing in front of it."""
    llm = SimulatedLLM({"max_num_seqs": rows, "max_model_len": 1}, step_s=STEP_MS / 1000, row_s=ROW_MS / 1000)
    for i in range(rows):
        llm.add_request(str(i), {}, SimpleNamespace(max_tokens=steps))
    start = time.perf_counter()
    for _ in range(steps):
        llm.step()
    return llm.tokens / (time.perf_counter() - start)


def metrics_env(tmp: Path) -> dict[str, str]:
    """Application Insights on, as `app_insights_enabled: true` turns it on for a deployment, with the connection
    string (which azmlinfsrv's exporters and ours all read) naming a local port nothing listens on; the exporters'
    retry files under `tmp`. The export interval is left to the product's default."""
    key = str(uuid.uuid4())
    tmp.mkdir(parents=True, exist_ok=True)
    return {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": key, "TMPDIR": str(tmp),
            "APPLICATIONINSIGHTS_CONNECTION_STRING":
                f"InstrumentationKey={key};IngestionEndpoint=http://127.0.0.1:{free_port()}/"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--operations", action="store_true", help="also an operated server, driven in turn")
    parser.add_argument("--metrics", action="store_true",
                        help="also a server with the metrics path alone (scraped, and exported to Azure Monitor)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="engine replicas (gunicorn workers) with the 8-GPU files' gunicorn flags; the baseline is "
                             "that many stand-ins, each stepping its share of the callers")
    args = parser.parse_args()
    deployment = yaml.safe_load((ROOT / "deployment.yml").read_text())
    env = {k: str(v) for k, v in deployment["environment_variables"].items()}
    env |= {"SIM_STEP_MS": str(STEP_MS), "SIM_ROW_MS": str(ROW_MS)}
    if args.replicas > 1:
        eight_gpus = yaml.safe_load((ROOT / "deployments" / "nd96amsr-a100.yml").read_text())["environment_variables"]
        env |= {"WORKER_COUNT": str(args.replicas), "GUNICORN_CMD_ARGS": eight_gpus["GUNICORN_CMD_ARGS"]}
    results = []
    entry = ROOT / "bench" / "entry" / "simulated_score.py"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir = package_model(build_tiny(Path(tmp) / "tiny-mixtral"), Path(tmp) / "model")
        servers = {"plain": stack.enter_context(LocalServer(model_dir, Path(tmp) / "server.log", env,
                                                            entry_script=entry))}
        if args.operations:
            operated = stack.enter_context(operations_env()).env
            servers["operated"] = stack.enter_context(LocalServer(model_dir, Path(tmp) / "operated.log",
                                                                  {**env, **operated}, entry_script=entry))
            stack.enter_context(scraping(servers["operated"].url))
        if args.metrics:
            servers["metrics"] = stack.enter_context(LocalServer(model_dir, Path(tmp) / "metrics.log",
                                                                 {**env, **metrics_env(Path(tmp) / "metrics-tmp")},
                                                                 entry_script=entry))
            stack.enter_context(scraping(servers["metrics"].url))
        for server in servers.values():
            asyncio.run(crowd(server.port, 8, 1, 8, False))  # warm-up
        for k, callers in enumerate(args.callers):
            rows = min(-(-callers // args.replicas), int(env["MIXTRAL_MAX_BATCH_SIZE"]))
            alone = args.replicas * engine_alone(rows, args.requests * args.new_tokens)  # replicas step side by side
            for stream in (False, True):
                rates = {}
                order = list(servers.items())
                # Which server goes first alternates between the modes and from one --callers entry to the next
                # (`--callers 256 256` runs each mode in both orders): drift falls on both.
                for name, server in order[::-1] if (k + stream) % 2 else order:
                    before = cpu_seconds(server)
                    tokens, seconds = asyncio.run(crowd(server.port, callers, args.requests, args.new_tokens, stream))
                    spent = {part: s - before[part] for part, s in cpu_seconds(server).items()}
                    rates[name] = tokens / seconds
                    results.append({"server": name, "callers": callers, "stream": stream, "tokens": tokens,
                                    "tokens_per_s": round(tokens / seconds, 1),
                                    "engine_alone_tokens_per_s": round(alone, 1),
                                    "share_of_engine": round(tokens / seconds / alone, 3),
                                    **{f"{part}_cpu_ms_per_request": round(1000 * s / (callers * args.requests), 2)
                                       for part, s in spent.items()}})
                    print(json.dumps(results[-1]), flush=True)
                for name in (name for name in servers if name != "plain"):
                    print(json.dumps({"server": name, "callers": callers, "stream": stream,
                                      "operated_over_plain": round(rates[name] / rates["plain"], 3)}), flush=True)
        stack.close()  # the servers stopped: their last exports made
        exports = azure_monitor_exports(Path(tmp) / "metrics.log", Path(tmp) / "metrics-tmp") if args.metrics else {}
    print(json.dumps({"machine": "see README", "step_ms": STEP_MS, "row_ms": ROW_MS, "replicas": args.replicas,
                      "deployment": {k: env[k] for k in ("GUNICORN_CMD_ARGS", "MIXTRAL_MAX_BATCH_SIZE",
                                                         "MIXTRAL_MAX_QUEUE")},
                      **({"azure_monitor": exports} if exports else {}), "results": results}, indent=2))


@contextlib.contextmanager
def scraping(url: str) -> Iterator[None]:
    """GET /metrics every second from a process of its own, as Prometheus scrapes (a thread here would take the
    GIL from this process's callers and count against the server)."""
    stop = multiprocessing.Event()
    scraper = multiprocessing.Process(target=scrape, args=(url, stop), daemon=True)
    scraper.start()
    try:
        yield
    finally:
        stop.set()
        scraper.join(timeout=5)


def azure_monitor_exports(log: Path, tmp: Path) -> dict[str, object]:
    """What shows the metrics server's exports were on: its log's line, and the envelopes its exporters stored
    to retry (one file per failed export), metrics and the rest (logs, traces) apart."""
    metric_files = other_files = 0
    for blob in tmp.rglob("*.blob*"):
        text = blob.read_text(errors="replace")
        if '"MetricData"' in text:
            metric_files += 1
        else:
            other_files += 1
    interval_s = DEFAULT_EXPORT_INTERVAL_MS / 1000
    return {"interval_s": interval_s,
            "started": f"metrics go to Azure Monitor every {interval_s:g} s" in log.read_text(errors="replace"),
            "failed_exports_stored": {"metrics": metric_files, "logs_and_traces": other_files}}


if __name__ == "__main__":
    main()
