"""The door and core's ceiling: how much of a GPU engine's throughput reaches the callers.

    .venv/bin/python bench/ceiling.py [--callers 64 256] [--requests 4] [--new-tokens 128] [--operations] [--metrics]
                                      [--replicas 2] [--engine-process false] [--vllm-serve]

A real azmlinfsrv, under deployment.yml's own environment (its threads, batch, queue and vLLM settings, and vLLM's
engine core in its own process, as MIXTRAL_ENGINE_PROCESS=auto runs it with GPUs), serves the embedded model on
vLLM's engine, with only vLLM's model executor replaced: a stand-in whose forward pass sleeps 20 ms + 0.06 ms per
row (a bf16 Mixtral decode step on one H200, reading all 93 GB of weights; bench/simulated_vllm.py). vLLM's
scheduler, cache and processes run as they do on a GPU (its window cut to what the callers use: on CPU the cache
takes rows x window of memory at start). N callers each send --requests /score requests of
--new-tokens tokens back to back, streamed and not, from one asyncio client in this process.

The baseline, measured in the same run: the same vLLM engine over the same stand-in with nothing in front, driven
by vLLM's own LLMEngine in a process of its own with N rows, each as many tokens as a caller's requests take.
Printed: the share of that throughput the callers got, and the CPU each process group spent per token: the door
(the gunicorn worker, or `vllm serve`'s API server) and vLLM's engine processes.

With --engine-process false, vLLM's engine core runs inside the worker (as it does by default without GPUs), and
the baseline likewise.

With --vllm-serve, `vllm serve` runs beside the server, over the same checkpoint, engine arguments and stand-in,
and both are driven in turn through /v1/completions (streamed with `stream_options.include_usage`): the anchor.

With --operations a second server runs beside the first, the same but with what an operator turns on
(bench/operations.py: /metrics scraped every second from a process of its own, model data collection to a local
sink, every prompt and answer screened by a local text:analyze server); the two are driven in turn and its throughput is
printed over the plain server's: what operating the endpoint costs at GPU scale.

With --replicas N the server runs N engine replicas, one gunicorn worker each, under the 8-GPU deployment files'
gunicorn flags (deployments/nd96amsr-a100.yml: connections capped at a replica's threads, ReplicaWorker), each
replica its own stand-in; the baseline is N times one engine stepping its share of the callers: whether an
instance of several replicas delivers the sum of theirs.

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
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operations import cpu_seconds, operations_env, scrape  # noqa: E402
from vllm_bench import vllm_serve  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.engines.vllm_engine import engine_args  # noqa: E402
from mixtral_endpoint.model.checkpoint import inspect_checkpoint  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny  # noqa: E402
from mixtral_endpoint.protocol.config import MODEL_NAME, ServerConfig  # noqa: E402
from mixtral_endpoint.serving.azure_monitor import DEFAULT_EXPORT_INTERVAL_MS  # noqa: E402
from tests.localserver import LocalServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEP_MS, ROW_MS = 20.0, 0.06
STAND_IN = "simulated_vllm.SimulatedExecutor"  # vLLM's distributed_executor_backend, by its name
USAGE = re.compile(rb'"completion_tokens": ?(\d+)')
PROMPT = "The capital of France is"


async def call(port: int, route: str, body: bytes) -> int:
    """One request over a fresh connection; the completion tokens its usage reports."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (route.encode(), len(body), body))
    await writer.drain()
    received = bytearray()
    while chunk := await reader.read(65536):  # streamed events are read as they come
        received += chunk
    writer.close()
    if not received.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(received[:300].decode(errors="replace"))
    return int(USAGE.findall(bytes(received))[-1])


async def crowd(port: int, callers: int, requests: int, new_tokens: int, stream: bool,
                route: str = "/score") -> tuple[int, float]:
    """`callers` callers at once, each sending `requests` requests in turn: (tokens received, seconds)."""
    if route == "/score":
        body = {"input_data": {"input_string": [PROMPT]},
                "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True, "stream": stream}}
    else:
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": new_tokens, "ignore_eos": True, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}
    encoded = json.dumps(body).encode()

    async def caller() -> int:
        return sum([await call(port, route, encoded) for _ in range(requests)])

    start = time.perf_counter()
    tokens = await asyncio.gather(*(caller() for _ in range(callers)))
    return sum(tokens), time.perf_counter() - start


def server_env(row_tokens: int, own_process: bool) -> dict[str, str]:
    """deployment.yml's environment over the stand-in, its window cut to rows of `row_tokens` (on CPU vLLM's cache
    takes rows x window of memory at start)."""
    deployment = yaml.safe_load((ROOT / "deployment.yml").read_text())
    window = row_tokens + 64
    return {k: str(v) for k, v in deployment["environment_variables"].items()} | stand_in_env(own_process) | {
        "MIXTRAL_MAX_TOTAL_TOKENS": str(window), "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": str(window // 2)}


def stand_in_env(own_process: bool) -> dict[str, str]:
    """What a process needs to run vLLM over the stand-in: its step times, and this folder importable by the
    processes vLLM starts."""
    return {"SIM_STEP_MS": str(STEP_MS), "SIM_ROW_MS": str(ROW_MS), "PYTHONPATH": str(ROOT / "bench"),
            "MIXTRAL_ENGINE_PROCESS": str(own_process).lower()}


def vllm_args(checkpoint: Path, env: dict[str, str]) -> dict[str, Any]:
    """The engine arguments our server gives vLLM for `checkpoint` under `env`, over the stand-in."""
    args, _ = engine_args(inspect_checkpoint(checkpoint), ServerConfig.from_env({**env, "MIXTRAL_ENGINE": "vllm"}))
    return {**args, "distributed_executor_backend": STAND_IN}


def engine_alone(args: dict[str, Any], rows: int, tokens: int, own_process: bool) -> float:
    """Tokens per second of vLLM's engine over the stand-in with nothing in front: `rows` rows of `tokens` tokens,
    from a fresh process (vLLM holds one engine per process)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_engine_alone, args, rows, tokens, stand_in_env(own_process)).result()


def _engine_alone(args: dict[str, Any], rows: int, tokens: int, env: dict[str, str]) -> float:
    os.environ.update(env, VLLM_ENABLE_V1_MULTIPROCESSING=str(int(env["MIXTRAL_ENGINE_PROCESS"] == "true")))
    sys.path.insert(0, env["PYTHONPATH"])
    from vllm import EngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.llm_engine import LLMEngine

    llm = LLMEngine.from_engine_args(EngineArgs(**args))
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA)
    for i in range(rows):
        llm.add_request(str(i), {"prompt_token_ids": [1, 1782, 1783, 1784, 1785, 1786]}, params)
    start, made = time.perf_counter(), 0
    while llm.has_unfinished_requests():
        made += sum(len(output.outputs[0].token_ids) for output in llm.step())
    rate = made / (time.perf_counter() - start)
    llm.engine_core.shutdown()  # its engine core process ends: this one can
    return rate


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
                             "that many engines, each stepping its share of the callers")
    parser.add_argument("--engine-process", choices=("true", "false"), default="true",
                        help="vLLM's engine core in its own process (the default with GPUs) or in the worker")
    parser.add_argument("--vllm-serve", action="store_true",
                        help="also `vllm serve` over the same stand-in; every server then driven on /v1/completions")
    args = parser.parse_args()
    own_process = args.engine_process == "true"
    env = server_env(args.requests * args.new_tokens, own_process)
    if args.replicas > 1:
        eight_gpus = yaml.safe_load((ROOT / "deployments" / "nd96amsr-a100.yml").read_text())["environment_variables"]
        env |= {"WORKER_COUNT": str(args.replicas), "GUNICORN_CMD_ARGS": eight_gpus["GUNICORN_CMD_ARGS"]}
    route = "/v1/completions" if args.vllm_serve else "/score"
    results = []
    entry = ROOT / "bench" / "entry" / "simulated_score.py"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        checkpoint = build_tiny(Path(tmp) / "tiny-mixtral")
        model_dir = package_model(checkpoint, Path(tmp) / "model")
        engine = vllm_args(checkpoint, env)
        servers = {"plain": stack.enter_context(LocalServer(model_dir, Path(tmp) / "server.log", env,
                                                            entry_script=entry))}
        if args.vllm_serve:
            servers["vllm_serve"] = stack.enter_context(vllm_serve(engine, Path(tmp) / "vllm_serve.log",
                                                                   {**os.environ, **env}))
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
            asyncio.run(crowd(server.port, 8, 1, 8, False, route))  # warm-up
        for k, callers in enumerate(args.callers):
            rows = min(-(-callers // args.replicas), int(env["MIXTRAL_MAX_BATCH_SIZE"]))
            # Replicas step side by side; a row takes as many tokens as a caller's requests.
            alone = args.replicas * engine_alone(engine, rows, args.requests * args.new_tokens, own_process)
            for stream in (False, True):
                rates = {}
                order = list(servers.items())
                # Which server goes first alternates between the modes and from one --callers entry to the next
                # (`--callers 256 256` runs each mode in both orders): drift falls on both.
                for name, server in order[::-1] if (k + stream) % 2 else order:
                    before = cpu_seconds(server.process.pid)
                    tokens, seconds = asyncio.run(crowd(server.port, callers, args.requests, args.new_tokens, stream,
                                                        route))
                    spent = {part: s - before[part] for part, s in cpu_seconds(server.process.pid).items()}
                    rates[name] = tokens / seconds
                    results.append({"server": name, "callers": callers, "stream": stream, "tokens": tokens,
                                    "tokens_per_s": round(tokens / seconds, 1),
                                    "engine_alone_tokens_per_s": round(alone, 1),
                                    "share_of_engine": round(tokens / seconds / alone, 3),
                                    **{f"{part}_cpu_us_per_token": round(1e6 * s / tokens, 1)
                                       for part, s in spent.items()}})
                    print(json.dumps(results[-1]), flush=True)
                for name in (name for name in servers if name not in ("plain", "vllm_serve")):
                    print(json.dumps({"server": name, "callers": callers, "stream": stream,
                                      "operated_over_plain": round(rates[name] / rates["plain"], 3)}), flush=True)
        stack.close()  # the servers stopped: their last exports made
        exports = azure_monitor_exports(Path(tmp) / "metrics.log", Path(tmp) / "metrics-tmp") if args.metrics else {}
    print(json.dumps({"machine": "see docs/benchmarks.md", "step_ms": STEP_MS, "row_ms": ROW_MS,
                      "replicas": args.replicas, "engine_process": own_process, "route": route,
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
