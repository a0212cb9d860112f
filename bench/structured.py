"""Constrained against unconstrained decoding, on both engines, with 8 concurrent callers, in one run.

    .venv/bin/python bench/structured.py --model tiny      # the embedded model (10 M parameters)
    .venv/bin/python bench/structured.py --model medium    # a ~125 M-parameter Mixtral built here

Each caller scores its prompts through the core (greedy, exactly --new-tokens each): unconstrained with
`ignore_eos`, and constrained by a JSON schema whose answers are longer than --new-tokens, so both make
the same tokens and the ratio is one of throughputs. The phases alternate, round after round, so the drift
of a shared machine falls on both alike; figures are medians. The tiny model's steps take a millisecond
or two, so there the grammar's per-token cost weighs the most: it is the worst case.

Then the compile time of a schema never seen before (our cache misses), and on each engine the latency
of a one-prompt request with a new schema against one with a schema already compiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import PROMPTS, build_checkpoint  # noqa: E402

from mixtral_endpoint.doors.score import serving as score_api  # noqa: E402
from mixtral_endpoint.protocol.config import ServerConfig  # noqa: E402
from mixtral_endpoint.protocol.constraints import Constraint  # noqa: E402
from mixtral_endpoint.serving.service import Scorer  # noqa: E402

CALLERS = 8
ENGINES = ("transformers", "vllm")


def long_schema(tag: str = "") -> dict:
    """Answers of ~150 tokens: a fixed-length array of small objects (enums and bounded integers)."""
    item = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice", "Lille" + tag]},
                                             "rank": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["city", "rank"]}
    return {"type": "object", "properties": {"visits": {"type": "array", "items": item, "minItems": 16,
                                                        "maxItems": 16}}, "required": ["visits"]}


def request(prompt: str, new_tokens: int, schema: dict | None) -> dict:
    parameters: dict = {"max_new_tokens": new_tokens, "ignore_eos": True}
    if schema is not None:
        parameters["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": schema}}
    return {"input_data": {"input_string": [{"role": "user", "content": prompt}]}, "parameters": parameters}


def phase(scorer: Scorer, new_tokens: int, per_caller: int, schema: dict | None) -> float:
    """Completion tokens per second of CALLERS callers, each scoring per_caller requests in turn."""
    def caller(index: int) -> int:
        tokens = 0
        for i in range(per_caller):
            body = score_api.score(scorer, request(PROMPTS[(index + i) % len(PROMPTS)], new_tokens, schema))
            assert body["usage"]["completion_tokens"] == new_tokens, body  # every row makes the same tokens
            tokens += new_tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(CALLERS) as pool:
        tokens = sum(pool.map(caller, range(CALLERS)))
    return tokens / (time.perf_counter() - start)


def latency(scorer: Scorer, schema: dict) -> float:
    start = time.perf_counter()
    score_api.score(scorer, request(PROMPTS[0], 8, schema))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--per-caller", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.model, Path(tmp) / args.model)
        scorers = {engine: Scorer.load(checkpoint, ServerConfig.from_env(
            {"MIXTRAL_ENGINE": engine, "MIXTRAL_MAX_BATCH_SIZE": str(CALLERS)})) for engine in ENGINES}
        schema = long_schema()
        for scorer in scorers.values():  # warm: first steps, the schema compiled
            phase(scorer, args.new_tokens, 1, None)
            phase(scorer, args.new_tokens, 1, schema)
        rates: dict[tuple[str, bool], list[float]] = {(e, c): [] for e in ENGINES for c in (False, True)}
        for round_ in range(args.repeat):
            for engine, scorer in scorers.items():
                for constrained in (False, True) if round_ % 2 == 0 else (True, False):
                    rates[engine, constrained].append(
                        phase(scorer, args.new_tokens, args.per_caller, schema if constrained else None))
        print(f"model={args.model} callers={CALLERS} new_tokens={args.new_tokens} rounds={args.repeat}")
        for engine in ENGINES:
            free, held = (statistics.median(rates[engine, c]) for c in (False, True))
            print(f"{engine:12s} unconstrained {free:8.1f} tok/s  constrained {held:8.1f} tok/s  "
                  f"ratio {held / free:.2f}")
        grammars = scorers["transformers"].grammars
        compile_ms = []
        for i in range(20):
            start = time.perf_counter()
            grammars.compile(Constraint.json_schema(long_schema(f"-{i}")))
            compile_ms.append((time.perf_counter() - start) * 1000)
        print(f"compile of a new schema (ours, xgrammar): median {statistics.median(compile_ms):.1f} ms")
        for engine, scorer in scorers.items():
            cached = statistics.median(latency(scorer, schema) for _ in range(5))
            new = statistics.median(latency(scorer, long_schema(f"+{engine}{i}")) for i in range(5))
            print(f"{engine:12s} 8-token request: cached schema {cached * 1000:.0f} ms, new schema "
                  f"{new * 1000:.0f} ms")
        for scorer in scorers.values():
            scorer.close()


if __name__ == "__main__":
    main()
