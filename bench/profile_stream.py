"""Where a streamed token's CPU goes: bench/ceiling.py's server at N streamed callers, measured and profiled.

    .venv/bin/pip install py-spy   # a bench tool only, not in requirements
    .venv/bin/python bench/profile_stream.py [--callers 256] [--requests 4] [--new-tokens 128] [--rate 100]

The same server as bench/ceiling.py (deployment.yml's environment, a real azmlinfsrv, vLLM's engine over the
stand-in executor stepping 20 ms + 0.06 ms per row, its engine core in its own process unless --engine-process
false). Four streamed runs of N callers from one asyncio client:

1. unprofiled: the share of the engine's tokens, and the gunicorn worker's CPU per token (user and system; its
   busiest thread, the engine's, apart), its threads' context switches per token, this client's CPU per token, the
   machine's idle share, and the step's length against the stand-in's sleep;
2. under `py-spy record --gil --nonblocking`: only the GIL holder is sampled, so the samples split the worker's
   Python time (which runs only under the GIL) by the innermost frame of ours or a library's that it is in;
3. under `py-spy record --nonblocking` (no --gil): every thread py-spy does not see idle;
4. under `perf stat` (the worker's sendto, futex and epoll_wait syscalls and context switches per token) and
   `perf record` (the worker's CPU by kernel and user symbol: where its system time goes).

Printed: one JSON object per run; the categories as shares of the samples and as microseconds per token (the
share times the GIL-held time per token: samples / rate / tokens). The raw py-spy and perf files are kept in --out.
Needs perf (linux-perf) for run 4.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceiling import ROW_MS, STEP_MS, crowd, engine_alone, server_env, vllm_args  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny  # noqa: E402
from tests.localserver import LocalServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# (category, test on a frame "function (file:line)"), tried from the innermost frame outward: the first match names
# the sample. Order matters only within one frame.
CATEGORIES = [
    ("engine: stand-in step", lambda f: "simulated_vllm.py" in f),
    ("engine: VllmEngine outputs", lambda f: "engines/vllm_engine.py" in f),
    ("engine: line / Row handoff", lambda f: "serving/line.py" in f or "engines/engine.py" in f),
    ("queue / threading (wake-ups)", lambda f: "/threading.py" in f or "/queue.py" in f),
    ("detokenizer", lambda f: "detoken" in f.lower() or "tokenizer" in f.lower()),
    ("core stream path (service.py)", lambda f: "serving/service.py" in f),
    ("metrics", lambda f: "serving/metrics.py" in f or "prometheus_client" in f),
    ("/score door: SSE rendering", lambda f: "mixtral_endpoint/doors/" in f or "/score.py" in f),
    ("gunicorn: write per chunk (sendall)",
     lambda f: f.startswith(("write_chunk (gunicorn/util.py", "write (gunicorn/util.py"))),
    ("gunicorn: other", lambda f: "gunicorn/" in f),
    ("werkzeug / flask", lambda f: "werkzeug/" in f or "flask/" in f),
    ("azmlinfsrv", lambda f: "azureml_inference_server_http" in f or "azmlinfsrv" in f),
    ("other library / stdlib", lambda f: "site-packages" in f or "/lib/python" in f),
]


def categorize(raw: Path) -> dict[str, int]:
    """Samples per category of py-spy's raw (collapsed) output: `frame;frame;... count`, outermost first."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        name = "unattributed"
        for frame in reversed(frames):
            name = next((c for c, test in CATEGORIES if test(frame)), "")
            if name:
                break
        counts[name or "unattributed"] += int(n)
    return dict(counts.most_common())


def leaves(raw: Path, top: int = 25) -> list[tuple[str, int]]:
    """The innermost frames with the most samples."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack.split(";")[-1]] += int(n)
    return counts.most_common(top)


def snapshot(worker: psutil.Process) -> dict[str, object]:
    times = worker.cpu_times()
    threads = {t.id: t.user_time + t.system_time for t in worker.threads()}
    switches = 0
    for tid in threads:
        try:
            status = Path(f"/proc/{worker.pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return {"user": times.user, "system": times.system, "threads": threads, "switches": switches}


def measure(worker: psutil.Process, port: int, args: argparse.Namespace, alone: float) -> dict[str, object]:
    before, client, machine = snapshot(worker), psutil.Process().cpu_times(), psutil.cpu_times()
    tokens, seconds = asyncio.run(crowd(port, args.callers, args.requests, args.new_tokens, True))
    after, client_after, machine_after = snapshot(worker), psutil.Process().cpu_times(), psutil.cpu_times()
    per = 1e6 / tokens
    rows = min(args.callers, 256)
    idle = machine_after.idle - machine.idle
    threads = {tid: s - before["threads"].get(tid, 0.0) for tid, s in after["threads"].items()}
    busiest = max(threads.values())
    return {"callers": args.callers, "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "share_of_engine": round(tokens / seconds / alone, 3),
            "worker_cpu_us_per_token": round((after["user"] + after["system"] - before["user"] - before["system"])
                                             * per, 1),
            "user_us_per_token": round((after["user"] - before["user"]) * per, 1),
            "system_us_per_token": round((after["system"] - before["system"]) * per, 1),
            "busiest_thread_us_per_token": round(busiest * per, 1),
            "worker_cpu_share_of_2_cores": round((after["user"] + after["system"] - before["user"]
                                                  - before["system"]) / seconds / psutil.cpu_count(), 3),
            "client_cpu_us_per_token": round((client_after.user + client_after.system - client.user - client.system)
                                             * per, 1),
            "machine_idle_share": round(idle / (sum(machine_after) - sum(machine)), 3),
            "step_ms": round(rows / (tokens / seconds) * 1000, 2),
            "step_sleep_ms": round(STEP_MS + ROW_MS * rows, 2),
            "busiest_thread_ms_per_step": round(busiest * rows / tokens * 1000, 2),
            "context_switches_per_token": round((after["switches"] - before["switches"]) / tokens, 2),
            "threads": len(threads)}


def profiled(worker: psutil.Process, port: int, args: argparse.Namespace, alone: float, out: Path,
             gil: bool) -> dict[str, object]:
    raw = out / ("gil.txt" if gil else "active.txt")
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(worker.pid),
                            "--format", "raw", "--nonblocking", "--rate", str(args.rate), "--output", str(raw),
                            *(["--gil"] if gil else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2)  # attached
    result = measure(worker, port, args, alone)
    spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
    spy.wait(timeout=60)
    counts = categorize(raw)
    total = sum(counts.values())
    return {"profile": "gil" if gil else "active threads", **result, "samples": total,
            "categories": {c: round(n / total, 3) for c, n in counts.items()},
            "top_leaves": [(f, round(n / total, 3)) for f, n in leaves(raw)]}


def perf(worker: psutil.Process, port: int, args: argparse.Namespace, alone: float, out: Path) -> dict[str, object]:
    events = ["syscalls:sys_enter_sendto", "syscalls:sys_enter_futex", "syscalls:sys_enter_epoll_wait",
              "context-switches"]
    stat = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(events), "-p", str(worker.pid),
                             "-o", str(out / "perf-stat.txt")], stderr=subprocess.DEVNULL)
    record = subprocess.Popen(["perf", "record", "-F", "499", "-p", str(worker.pid), "-o", str(out / "perf.data")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    result = measure(worker, port, args, alone)
    for p in (stat, record):
        p.send_signal(2)
        p.wait(timeout=120)
    counts = {}
    for line in (out / "perf-stat.txt").read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            counts[fields[2].replace("syscalls:sys_enter_", "")] = round(int(fields[0]) / result["tokens"], 2)
    report = subprocess.run(["perf", "report", "-i", str(out / "perf.data"), "--stdio", "--sort", "dso,sym",
                             "--percent-limit", "0.7"], capture_output=True, text=True).stdout
    top = [line.strip() for line in report.splitlines() if line.strip() and not line.startswith("#")][:40]
    return {"profile": "perf", **result, "per_token_with_attach_slack": counts, "perf_top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--engine-process", choices=("true", "false"), default="true",
                        help="vLLM's engine core in its own process (the default with GPUs) or in the worker")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "profile_stream")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    own_process = args.engine_process == "true"
    env = server_env(args.requests * args.new_tokens, own_process)
    entry = ROOT / "bench" / "entry" / "simulated_score.py"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny(Path(tmp) / "tiny-mixtral")
        model_dir = package_model(checkpoint, Path(tmp) / "model")
        with LocalServer(model_dir, Path(tmp) / "server.log", env, entry_script=entry) as server:
            worker, = psutil.Process(server.process.pid).children()
            asyncio.run(crowd(server.port, 8, 1, 8, True))  # warm-up
            alone = engine_alone(vllm_args(checkpoint, env), min(args.callers, int(env["MIXTRAL_MAX_BATCH_SIZE"])),
                                 args.requests * args.new_tokens, own_process)
            plain = {"profile": None, **measure(worker, server.port, args, alone)}
            print(json.dumps(plain), flush=True)
            for gil in (True, False):
                result = profiled(worker, server.port, args, alone, args.out, gil)
                held = result["samples"] / args.rate / result["tokens"] * 1e6  # µs of sampled time per token
                result["sampled_us_per_token"] = round(held, 1)
                result["categories_us_per_token"] = {c: round(s * held, 1) for c, s in result["categories"].items()}
                print(json.dumps(result), flush=True)
            print(json.dumps(perf(worker, server.port, args, alone, args.out)), flush=True)
    print(json.dumps({"engine_alone_tokens_per_s": round(alone, 1), "out": str(args.out)}), flush=True)


if __name__ == "__main__":
    main()
