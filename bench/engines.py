"""Both engines of the server, and MLflow predict, against raw vLLM on the same checkpoint and prompt ids.

    .venv/bin/python bench/engines.py --model tiny      # the embedded model (10 M parameters)
    .venv/bin/python bench/engines.py --model medium    # a ~125 M-parameter Mixtral built here

In one run, on one checkpoint, greedy with `ignore_eos` so every row makes exactly --new-tokens:
- raw vLLM: one `LLM.generate` call of all prompts' token ids (the anchor);
- the server (azmlinfsrv) on each engine, N callers at once over HTTP;
- MLflow predict over a DataFrame of the N prompts vs one batched transformers `generate`.
Each figure is the median of --repeat runs; the ratios are throughput against the anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_endpoint.localserver import LocalServer  # noqa: E402
from mixtral_endpoint.packaging import package_model  # noqa: E402
from mixtral_endpoint.tiny import build_tiny, tiny_config  # noqa: E402
from mixtral_endpoint.tokenizer import PromptTokenizer, reference_tokenizer_file  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "In 1969, the first", "Mixture of experts models",
           "def fibonacci(n):", "Dear hiring manager,", "The recipe calls for", "Azure Machine Learning"]
MEDIUM_SIZES = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 7, "num_attention_heads": 4,
                "num_key_value_heads": 1, "head_dim": 128}


def build_checkpoint(kind: str, out: Path) -> Path:
    if kind == "tiny":
        return build_tiny(out)
    torch.manual_seed(0)
    config = MixtralConfig(**{**tiny_config().to_dict(), **MEDIUM_SIZES})
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # wide logit margins, as the tiny model has
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="100MB")
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    (out / "tokenizer.model").write_bytes(reference_tokenizer_file().read_bytes())
    return out


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def post(url: str, prompt: str, n: int) -> list[int]:
    payload = {"input_data": {"input_string": [prompt]},
               "parameters": {"max_new_tokens": n, "ignore_eos": True, "return_token_ids": True}}
    response = requests.post(url + "/score", json=payload, timeout=600)
    response.raise_for_status()
    return response.json()[0]["token_ids"]


def server_crowd(model_dir: Path, engine: str, prompts: list[str], n: int, repeat: int, log: Path
                 ) -> tuple[float, list[list[int]]]:
    env = {"MIXTRAL_ENGINE": engine, "MIXTRAL_MAX_BATCH_SIZE": str(len(prompts)),
           "MIXTRAL_MAX_QUEUE": str(2 * len(prompts)), "MIXTRAL_MAX_TOTAL_TOKENS": "2048"}
    with LocalServer(model_dir, log, env, threads=3 * len(prompts)) as server, \
            ThreadPoolExecutor(len(prompts)) as pool:
        post(server.url, prompts[0], 4)  # warm-up
        answers: list[list[int]] = []
        seconds = median_time(lambda: answers.__setitem__(slice(None), pool.map(
            lambda p: post(server.url, p, n), prompts)), repeat)
    return seconds, answers


def predict_vs_generate(model_dir: Path, checkpoint: Path, ids: list[list[int]], prompts: list[str], n: int,
                        repeat: int) -> tuple[float, float]:
    import mlflow.pyfunc
    import pandas as pd

    os.environ["MIXTRAL_ENGINE"] = "transformers"
    os.environ["MIXTRAL_MAX_TOTAL_TOKENS"] = "2048"
    model = mlflow.pyfunc.load_model(str(model_dir))
    frame = pd.DataFrame({"input_string": prompts})
    params = {"max_new_tokens": n, "ignore_eos": True}
    model.predict(frame.head(2), params={"max_new_tokens": 4})  # warm-up
    predict_s = median_time(lambda: model.predict(frame, params=params), repeat)
    model.unwrap_python_model().scorer.close()

    hf = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[2] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=2)

    def generate() -> None:
        with torch.inference_mode():
            hf.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)

    generate()  # warm-up
    return predict_s, median_time(generate, repeat)


def raw_vllm(checkpoint: Path, ids: list[list[int]], n: int, repeat: int) -> tuple[float, list[list[int]]]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, as the server's engine runs
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=2048, max_num_seqs=len(ids), seed=0, generation_config="vllm",
              kv_cache_memory_bytes=256 * 2**20)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in ids]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, detokenize=False), use_tqdm=False)
    outputs: list = []
    seconds = median_time(lambda: outputs.__setitem__(slice(None), llm.generate(prompts, params, use_tqdm=False)),
                          repeat)
    return seconds, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, prompts = args.new_tokens, PROMPTS[: args.callers]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.model, Path(tmp) / f"{args.model}-mixtral")
        model_dir = package_model(checkpoint, Path(tmp) / "model", reference=True)
        ids = [PromptTokenizer(checkpoint / "tokenizer.model").encode_text(p) for p in prompts]
        figures: dict[str, float] = {}
        answers: dict[str, list[list[int]]] = {}
        # The servers run in their own processes; raw vLLM last, in this one (it sets torch's threads).
        for engine in ("transformers", "vllm"):
            figures[f"server_{engine}_s"], answers[engine] = server_crowd(
                model_dir, engine, prompts, n, args.repeat, Path(tmp) / f"{engine}.log")
        figures["predict_s"], figures["generate_batched_s"] = predict_vs_generate(
            model_dir, checkpoint, ids, prompts, n, args.repeat)
        figures["raw_vllm_s"], answers["raw_vllm"] = raw_vllm(checkpoint, ids, n, args.repeat)

    tokens = len(prompts) * n
    report = {
        "model": args.model, "parameters_m": round(_parameters(args.model) / 1e6, 1),
        "cpu_threads": os.cpu_count(), "callers": len(prompts), "new_tokens": n, "repeat": args.repeat,
        **{k: round(v, 3) for k, v in figures.items()},
        "raw_vllm_tokens_per_s": round(tokens / figures["raw_vllm_s"], 1),
        "server_transformers_vs_raw_vllm": round(figures["raw_vllm_s"] / figures["server_transformers_s"], 3),
        "server_vllm_vs_raw_vllm": round(figures["raw_vllm_s"] / figures["server_vllm_s"], 3),
        "predict_vs_batched_generate": round(figures["generate_batched_s"] / figures["predict_s"], 3),
        "same_greedy_tokens": answers["transformers"] == answers["vllm"] == answers["raw_vllm"],
    }
    print(json.dumps(report, indent=2))


def _parameters(kind: str) -> int:
    config = tiny_config() if kind == "tiny" else MixtralConfig(**{**tiny_config().to_dict(), **MEDIUM_SIZES})
    with torch.device("meta"):
        return sum(p.numel() for p in MixtralForCausalLM(config).parameters())


if __name__ == "__main__":
    main()
