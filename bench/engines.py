"""Both engines of the server, and MLflow predict, against raw vLLM on the same checkpoint and prompt ids.

    .venv/bin/python bench/engines.py --model tiny      # the embedded model (10 M parameters)
    .venv/bin/python bench/engines.py --model medium    # a ~125 M-parameter Mixtral built here

In one run, on one checkpoint, greedy with `ignore_eos` so every row makes exactly --new-tokens:
- raw vLLM: one `LLM.generate` call of all prompts' token ids, with its engine core in this process
  (the anchor, and the strictest one: on these 2 cores it beat vLLM's default) and as `LLM` runs
  by default, its engine core in a child process;
- the server (azmlinfsrv) on each engine, N callers at once over HTTP;
- MLflow predict over a DataFrame of the N prompts vs one batched transformers `generate`.
The servers and both raw vLLMs are loaded at once and timed in turn, round after round, so that the
drift of a shared machine falls on every figure alike. Each figure is the median of --repeat rounds;
the ratios are throughput against the anchor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny, tiny_config  # noqa: E402
from mixtral_endpoint.model.tokenizer import PromptTokenizer, reference_tokenizer_file  # noqa: E402
from tests.localserver import LocalServer  # noqa: E402

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


Run = Callable[[], list[list[int]]]  # one timed run: the new token ids of every prompt
# Between runs: vLLM's default worker busy-polls its queue for 1 s after its last message, which
# took a core from whatever ran next (our server at 0.43x, measured, instead of 0.93x).
SETTLE_S = 2.0


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rounds(runs: dict[str, Run], repeat: int) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """Each run once per round, in turn, after an untimed round (the first run of a batch shape builds
    kernels and caches: our server's first full run took 1.5x its later ones); the seconds of each,
    sorted, and its last answers."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    answers: dict[str, list[list[int]]] = {}
    for run in runs.values():
        run()
    for _ in range(repeat):
        for name, run in runs.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            answers[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t) for name, t in times.items()}, answers


def post(url: str, prompt: str, n: int) -> list[int]:
    payload = {"input_data": {"input_string": [prompt]},
               "parameters": {"max_new_tokens": n, "ignore_eos": True, "return_token_ids": True}}
    response = requests.post(url + "/score", json=payload, timeout=600)
    response.raise_for_status()
    return response.json()[0]["token_ids"]


@contextlib.contextmanager
def server_crowd(model_dir: Path, engine: str, prompts: list[str], n: int, log: Path) -> Iterator[Run]:
    """The server on `engine`; each run, every prompt posted by its own caller at once."""
    env = {"MIXTRAL_ENGINE": engine, "MIXTRAL_MAX_BATCH_SIZE": str(len(prompts)),
           "MIXTRAL_MAX_QUEUE": str(2 * len(prompts)), "MIXTRAL_MAX_TOTAL_TOKENS": "2048"}
    with LocalServer(model_dir, log, env, threads=3 * len(prompts)) as server, \
            ThreadPoolExecutor(len(prompts)) as pool:
        yield lambda: list(pool.map(lambda p: post(server.url, p, n), prompts))


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


def raw_vllm(checkpoint: Path, ids: list[list[int]], n: int) -> Run:
    """vLLM's `LLM`; each run, one `generate` of every prompt's ids."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=2048, max_num_seqs=len(ids), seed=0, generation_config="vllm",
              kv_cache_memory_bytes=256 * 2**20)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in ids]
    return lambda: [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


_ANSWER = "answer: "  # marks the child's answer lines among vLLM's own output


@contextlib.contextmanager
def raw_vllm_default(checkpoint: Path, ids: list[list[int]], n: int) -> Iterator[Run]:
    """raw_vllm with vLLM's defaults (its engine core in a child process), in a process of its own:
    vLLM holds one engine per process. Each run is one line to it and one answer back."""
    child = subprocess.Popen([sys.executable, __file__, "--serve-raw-vllm", str(checkpoint), "--new-tokens", str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps(ids) + "\n")
    child.stdin.flush()

    def answer() -> list[list[int]]:
        while not (line := child.stdout.readline()).startswith(_ANSWER):
            if not line:
                raise RuntimeError(f"the raw vLLM process exited ({child.wait()})")
        return json.loads(line[len(_ANSWER):])

    def run() -> list[list[int]]:
        child.stdin.write("go\n")
        child.stdin.flush()
        return answer()

    try:
        answer()  # ready: loaded
        yield run
    finally:
        child.stdin.close()
        child.wait(timeout=120)


def serve_raw_vllm(checkpoint: Path, n: int) -> None:
    """The child of raw_vllm_default: prompt ids on the first line, then one generate per line."""
    run = raw_vllm(checkpoint, json.loads(sys.stdin.readline()), n)
    print(_ANSWER + "[]", flush=True)
    for _ in sys.stdin:
        print(_ANSWER + json.dumps(run()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve-raw-vllm", type=Path, help=argparse.SUPPRESS)  # raw_vllm_default's child
    args = parser.parse_args()
    n, prompts = args.new_tokens, PROMPTS[: args.callers]
    if args.serve_raw_vllm:
        return serve_raw_vllm(args.serve_raw_vllm, n)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.model, Path(tmp) / f"{args.model}-mixtral")
        model_dir = package_model(checkpoint, Path(tmp) / "model", reference=True)
        ids = [PromptTokenizer(checkpoint / "tokenizer.model").encode_text(p) for p in prompts]
        predict_s, generate_s = predict_vs_generate(model_dir, checkpoint, ids, prompts, n, args.repeat)
        # The servers and the default vLLM run in their own processes; the anchor last, in this one
        # (it binds torch's threads).
        with server_crowd(model_dir, "transformers", prompts, n, Path(tmp) / "transformers.log") as ours, \
                server_crowd(model_dir, "vllm", prompts, n, Path(tmp) / "vllm.log") as on_vllm, \
                raw_vllm_default(checkpoint, ids, n) as default:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, as the server's engine runs
            times, answers = rounds({"server_transformers": ours, "server_vllm": on_vllm,
                                     "raw_vllm_default": default, "raw_vllm": raw_vllm(checkpoint, ids, n)},
                                    args.repeat)
        figures = {f"{name}_s": statistics.median(t) for name, t in times.items()}
        figures.update(predict_s=predict_s, generate_batched_s=generate_s)

    tokens = len(prompts) * n
    report = {
        "model": args.model, "parameters_m": round(_parameters(args.model) / 1e6, 1),
        "cpu_threads": os.cpu_count(), "callers": len(prompts), "new_tokens": n, "repeat": args.repeat,
        **{k: round(v, 3) for k, v in figures.items()},
        "raw_vllm_tokens_per_s": round(tokens / figures["raw_vllm_s"], 1),
        "server_transformers_vs_raw_vllm": round(figures["raw_vllm_s"] / figures["server_transformers_s"], 3),
        "server_vllm_vs_raw_vllm": round(figures["raw_vllm_s"] / figures["server_vllm_s"], 3),
        "raw_vllm_default_vs_raw_vllm": round(figures["raw_vllm_s"] / figures["raw_vllm_default_s"], 3),
        "server_vllm_vs_raw_vllm_default": round(figures["raw_vllm_default_s"] / figures["server_vllm_s"], 3),
        "predict_vs_batched_generate": round(figures["generate_batched_s"] / figures["predict_s"], 3),
        "same_greedy_tokens": all(a == answers["raw_vllm"] for a in answers.values()),
        "rounds_s": {name: [round(x, 3) for x in t] for name, t in times.items()},  # each run, sorted
    }
    print(json.dumps(report, indent=2))


def _parameters(kind: str) -> int:
    config = tiny_config() if kind == "tiny" else MixtralConfig(**{**tiny_config().to_dict(), **MEDIUM_SIZES})
    with torch.device("meta"):
        return sum(p.numel() for p in MixtralForCausalLM(config).parameters())


if __name__ == "__main__":
    main()
