"""What log-probabilities cost: the same requests with `logprobs: 5` (each new token's and its top 5) against
none, on each engine, through a real server, in one run.

    .venv/bin/python bench/logprobs.py --model tiny      # the embedded model (10 M parameters)
    .venv/bin/python bench/logprobs.py --model medium    # a ~125 M-parameter Mixtral built here

One azmlinfsrv per engine, one at a time; --callers callers at once post OpenAI completions
(`/v1/completions`, greedy, `ignore_eos`, --new-tokens each, not streamed: log-probabilities come in whole
answers) over HTTP, --requests each per phase. The phases, logprobs off and on, alternate round after round
(the order flips each round), so the drift of a shared machine falls on both alike, after an untimed round of
each. Printed, one JSON line each: every phase's output-token throughput, then per engine the median of the
rounds' on/off ratios; last, a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import PROMPTS, build_checkpoint  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.protocol.config import MODEL_NAME  # noqa: E402
from tests.localserver import LocalServer  # noqa: E402

ENGINES = ("transformers", "vllm")
TOP = 5  # OpenAI's completions allow at most 5 alternatives per token


def post(url: str, prompt: str, new_tokens: int, logprobs: bool) -> int:
    """One completion; its completion tokens (checked: with logprobs, each token came with its alternatives; their
    count is not checked, since alternatives that decode to the same text share a key)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if logprobs:
        body["logprobs"] = TOP
    response = requests.post(url + "/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    tokens = answer["usage"]["completion_tokens"]
    assert tokens == new_tokens, answer["usage"]
    returned = answer["choices"][0]["logprobs"]
    if logprobs:
        assert len(returned["token_logprobs"]) == tokens and all(returned["top_logprobs"])
    else:
        assert returned is None, returned
    return tokens


def phase(pool: ThreadPoolExecutor, url: str, callers: int, requests_each: int, new_tokens: int,
          logprobs: bool) -> float:
    """Output tokens per second of `callers` callers, each posting requests_each completions in turn."""
    def caller(index: int) -> int:
        return sum(post(url, PROMPTS[(index + i) % len(PROMPTS)], new_tokens, logprobs) for i in range(requests_each))

    start = time.perf_counter()
    tokens = sum(pool.map(caller, range(callers)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="per caller, per phase")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of both phases")
    args = parser.parse_args()
    summary: dict[str, object] = {"model": args.model, "cpu_threads": os.cpu_count(), "callers": args.callers,
                                  "new_tokens": args.new_tokens, "requests_per_caller": args.requests,
                                  "rounds": args.repeat, "top_logprobs": TOP}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.model, Path(tmp) / f"{args.model}-mixtral")
        model_dir = package_model(checkpoint, Path(tmp) / "model", reference=True)
        for engine in args.engines:
            env = {"MIXTRAL_ENGINE": engine, "MIXTRAL_MAX_BATCH_SIZE": str(args.callers),
                   "MIXTRAL_MAX_QUEUE": str(2 * args.callers), "MIXTRAL_MAX_TOTAL_TOKENS": "2048"}
            with LocalServer(model_dir, Path(tmp) / f"{engine}.log", env, threads=3 * args.callers) as server, \
                    ThreadPoolExecutor(args.callers) as pool:
                for logprobs in (False, True):  # untimed: the first run of a batch shape builds kernels and caches
                    phase(pool, server.url, args.callers, 1, args.new_tokens, logprobs)
                rates: dict[bool, list[float]] = {False: [], True: []}
                for round_ in range(args.repeat):
                    for logprobs in (False, True) if round_ % 2 == 0 else (True, False):
                        rate = phase(pool, server.url, args.callers, args.requests, args.new_tokens, logprobs)
                        rates[logprobs].append(rate)
                        print(json.dumps({"engine": engine, "round": round_, "logprobs": TOP if logprobs else None,
                                          "tokens_per_s": round(rate, 1)}), flush=True)
            ratios = [on / off for on, off in zip(rates[True], rates[False], strict=True)]
            result = {"engine": engine, "off_tokens_per_s": round(statistics.median(rates[False]), 1),
                      "on_tokens_per_s": round(statistics.median(rates[True]), 1),
                      "on_over_off": round(statistics.median(ratios), 3),
                      "rounds_on_over_off": [round(r, 3) for r in ratios]}
            print(json.dumps(result), flush=True)
            summary[engine] = result
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
