"""Serving benchmark through a real azmlinfsrv, against transformers generate on the same model.

    .venv/bin/python bench/serving.py [--callers 8] [--new-tokens 64] [--repeat 3]

(a) overhead: one request over HTTP vs `generate` in-process on the same prompt ids and settings;
(b) concurrency: N callers at once vs the same requests one at a time through the same server, and
    vs one batched `generate` call of all N;
(c) time to first token (streamed) at 1 and N callers.
Each figure is a ratio against a baseline measured in the same run; the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import MixtralForCausalLM  # noqa: E402

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny  # noqa: E402
from mixtral_endpoint.model.tokenizer import PromptTokenizer  # noqa: E402
from tests.localserver import LocalServer  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "In 1969, the first", "Mixture of experts models",
           "def fibonacci(n):", "Dear hiring manager,", "The recipe calls for", "Azure Machine Learning"]


def generate(model: MixtralForCausalLM, prompts: list[list[int]], new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], pad_token_id=2)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return time.perf_counter() - start


def post(url: str, prompt: str, new_tokens: int, stream: bool = False) -> tuple[float, float]:
    """(seconds to the whole answer, seconds to the first streamed chunk or the answer)."""
    payload = {"input_data": {"input_string": [prompt]},
               "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True, "stream": stream}}
    start = time.perf_counter()
    response = requests.post(url + "/score", json=payload, timeout=600, stream=stream)
    response.raise_for_status()
    first = None
    for _ in response.iter_content(chunk_size=None):
        first = first or time.perf_counter() - start
    return time.perf_counter() - start, first or time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, prompts = args.new_tokens, PROMPTS[: args.callers]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = package_model(build_tiny(Path(tmp) / "tiny-mixtral"), Path(tmp) / "model")
        checkpoint = model_dir / "artifacts" / "tiny-mixtral"
        tokenizer = PromptTokenizer(checkpoint / "tokenizer.model")
        ids = [tokenizer.encode_text(p) for p in prompts]
        model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        env = {"MIXTRAL_MAX_BATCH_SIZE": str(args.callers), "MIXTRAL_MAX_QUEUE": str(2 * args.callers)}
        with LocalServer(model_dir, Path(tmp) / "server.log", env, threads=3 * args.callers) as server:
            post(server.url, prompts[0], 4)  # warm-up, both sides
            generate(model, ids[:2], 4)
            runs = []
            for _ in range(args.repeat):
                run = {"generate_one_s": generate(model, ids[:1], n),
                       "http_one_s": post(server.url, prompts[0], n)[0],
                       "generate_batched_s": generate(model, ids, n)}
                start = time.perf_counter()
                for prompt in prompts:
                    post(server.url, prompt, n)
                run["http_sequential_s"] = time.perf_counter() - start
                with ThreadPoolExecutor(len(prompts)) as pool:
                    start = time.perf_counter()
                    list(pool.map(lambda p: post(server.url, p, n), prompts))
                    run["http_crowd_s"] = time.perf_counter() - start
                    run["ttft_crowd_s"] = statistics.median(
                        pool.map(lambda p: post(server.url, p, n, stream=True)[1], prompts))
                run["ttft_one_s"] = post(server.url, prompts[0], n, stream=True)[1]
                runs.append(run)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    tokens = len(prompts) * n
    report = {
        "machine": f"{torch.get_num_threads()} CPU threads", "callers": len(prompts), "new_tokens": n,
        **{k: round(v, 4) for k, v in median.items()},
        "overhead_http_vs_generate": round(median["http_one_s"] / median["generate_one_s"], 3),
        "crowd_vs_batched_generate_throughput": round(median["generate_batched_s"] / median["http_crowd_s"], 3),
        "crowd_vs_sequential_throughput": round(median["http_sequential_s"] / median["http_crowd_s"], 3),
        "http_crowd_tokens_per_s": round(tokens / median["http_crowd_s"], 1),
        "generate_batched_tokens_per_s": round(tokens / median["generate_batched_s"], 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
