"""Soak test on loopback (`make soak`): many concurrent callers mixing good, bad and huge requests.

    .venv/bin/python bench/soak.py [--seconds 120] [--callers 32] [--margin-mib 100] [--operations]

Bounded in time and count, against a real azmlinfsrv on 127.0.0.1 serving the embedded model.
Fails (exit 1) on any answer other than 200 / 4xx / 429 / 503, on a dropped connection, on a
server that is not healthy afterwards, or on worker memory growing more than --margin-mib.
Prints p50/p99 latencies and the counts. With --operations, the server runs with model data collection
(to a local sink) and content screening (by a local text:analyze server) on, and /metrics scraped.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.operations import operations_env, scrape  # noqa: E402
from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny  # noqa: E402
from tests.localserver import LocalServer  # noqa: E402

CHAT = [{"role": "user", "content": "What is so great about the Eiffel Tower?"}]
ALLOWED = {200, 400, 413, 429, 503}


def chat(rng: random.Random) -> dict:
    return {"input_data": {"input_string": CHAT}, "parameters": {
        "max_new_tokens": rng.randint(1, 32), "do_sample": rng.random() < 0.5, "seed": rng.randint(0, 99)}}


def text(rng: random.Random) -> dict:
    return {"input_data": {"input_string": ["Once upon a time"] * rng.randint(1, 4)},
            "parameters": {"max_new_tokens": rng.randint(1, 16), "stop": ["the"]}}


BAD = [b"{", b"", b'{"input_data": {"input_string": []}}', b'{"input_data": {"input_string": ["x"]}, "parameters":'
       b' {"temperature": -1}}', b'{"input_data": {"input_string": [{"role": "assistant", "content": "x"}]}}',
       b'{"input_data": {"input_string": ["x"]}, "parameters": {"max_new_token": 3}}', b"\xff\xfe", b"[" * 3000]


def caller(url: str, deadline: float, seed: int, stats: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choices(["chat", "text", "stream", "bad", "huge", "disconnect"], [40, 20, 10, 20, 5, 5])[0]
        start = time.perf_counter()
        try:
            if kind in ("chat", "text"):
                response = requests.post(url + "/score", json=chat(rng) if kind == "chat" else text(rng), timeout=120)
            elif kind == "stream":
                body = {**chat(rng), "parameters": {"max_new_tokens": 16, "stream": True}}
                response = requests.post(url + "/score", json=body, timeout=120)
            elif kind == "bad":
                response = requests.post(url + "/score", data=rng.choice(BAD), timeout=120)
            elif kind == "huge":
                huge = b'{"input_data": "' + b"x" * 2_000_000 + b'"}'
                response = requests.post(url + "/score", data=huge, timeout=120)
            else:
                body = {**chat(rng), "parameters": {"max_new_tokens": 32, "stream": True}}
                with requests.post(url + "/score", json=body, timeout=120, stream=True) as response:
                    next(response.iter_content(16), None)  # read a little, then hang up
            status = response.status_code
        except requests.RequestException as exc:
            status = f"connection error: {type(exc).__name__}"
        with lock:
            stats["status"][status] += 1
            stats["kind"][kind] += 1
            if kind in ("chat", "text") and status == 200:
                stats["latency"].append(time.perf_counter() - start)
        if status == 429:
            time.sleep(rng.uniform(0.2, 1.0))  # a polite caller backs off (Retry-After says 2 s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--margin-mib", type=float, default=100)
    parser.add_argument("--operations", action="store_true", help="metrics scraped, data collection, screening")
    args = parser.parse_args()

    env = {"MIXTRAL_MAX_NEW_TOKENS": "32", "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "16", "MIXTRAL_MAX_BATCH_SIZE": "8",
           "MIXTRAL_MAX_QUEUE": "16"}
    stats = {"status": collections.Counter(), "kind": collections.Counter(), "latency": []}
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as tmp, operations_env() as stand_ins:
        model = package_model(build_tiny(Path(tmp) / "tiny-mixtral"), Path(tmp) / "model")
        with LocalServer(model, Path(tmp) / "server.log", {**env, **(stand_ins.env if args.operations else {})},
                         threads=24) as server:
            stop = threading.Event()
            if args.operations:
                threading.Thread(target=scrape, args=(server.url, stop), daemon=True).start()
            worker = psutil.Process(server.process.pid).children()[0]
            warm = random.Random(0)
            for _ in range(20):
                requests.post(server.url + "/score", json=chat(warm), timeout=60)
            rss_before = worker.memory_info().rss
            deadline = time.monotonic() + args.seconds
            threads = [threading.Thread(target=caller, args=(server.url, deadline, i, stats, lock))
                       for i in range(args.callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(2)  # let cancelled streams leave the batch
            healthy = requests.post(server.url + "/score", json=chat(warm), timeout=60).status_code == 200
            rss_after = worker.memory_info().rss
            stop.set()
    latency = sorted(stats["latency"])
    growth_mib = (rss_after - rss_before) / 2**20
    bad_statuses = {s: n for s, n in stats["status"].items() if s not in ALLOWED}
    report = {
        "seconds": args.seconds, "callers": args.callers, "requests": sum(stats["kind"].values()),
        "by_kind": dict(stats["kind"]), "by_status": {str(k): v for k, v in stats["status"].items()},
        "p50_s": round(statistics.median(latency), 3) if latency else None,
        "p99_s": round(latency[int(0.99 * (len(latency) - 1))], 3) if latency else None,
        "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_growth_mib": round(growth_mib, 1), "healthy_after": healthy, "operations": args.operations,
    }
    print(json.dumps(report, indent=2))
    failures = [f"unexpected answers: {bad_statuses}"] if bad_statuses else []
    failures += [] if healthy else ["the server did not answer a good request afterwards"]
    failures += [f"worker memory grew {growth_mib:.0f} MiB > {args.margin_mib}"] if growth_mib > args.margin_mib else []
    for failure in failures:
        print("SOAK FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
