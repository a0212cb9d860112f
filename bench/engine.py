"""Step-level benchmark, in-process: our continuous batching vs transformers generate on the same model.
(`bench/engines.py` compares both engines of the server with raw vLLM.)

    python bench/engine.py --model tiny            # CPU or GPU, the embedded tiny Mixtral
    python bench/engine.py --model mixtral         # GPU: random bf16 weights of Mixtral-8x7B's real config

Every figure is a ratio against a baseline measured in the same run: one batched `generate` call
of all prompts (the best a plain transformers loop can do) and one-prompt `generate`. Greedy,
`ignore_eos`, so every row produces exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_endpoint.checkpoint import MIXTRAL_8X7B_CONFIG  # noqa: E402
from mixtral_endpoint.engine import Row  # noqa: E402
from mixtral_endpoint.sampling import SamplingSettings  # noqa: E402
from mixtral_endpoint.stepper import Stepper  # noqa: E402
from mixtral_endpoint.tiny import tiny_model  # noqa: E402
from mixtral_endpoint.transformers_engine import TransformersEngine  # noqa: E402

ACTIVE_PARAMETERS = 12.9e9  # Mixtral-8x7B, per token: 2 of 8 experts plus the shared layers
H200_BANDWIDTH = 4.8e12  # bytes/s, the data sheet's HBM3e figure


def build(kind: str, device: torch.device) -> MixtralForCausalLM:
    if kind == "tiny":
        model = tiny_model().to(device)
        return model if device.type == "cuda" else model.float()
    config = MixtralConfig(**{k: v for k, v in MIXTRAL_8X7B_CONFIG.items() if k not in ("model_type", "torch_dtype")})
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def hf_generate(model: MixtralForCausalLM, prompts: list[list[int]], new_tokens: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=[], pad_token_id=2)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert out.shape[1] == width + new_tokens


def crowd(scheduler: TransformersEngine, prompts: list[list[int]], settings: SamplingSettings) -> list[Row]:
    """Every prompt submitted at once by its own caller thread; returns when all are done."""
    rows = [Row(p, settings) for p in prompts]
    callers = [threading.Thread(target=scheduler.submit, args=([row],)) for row in rows]
    for caller in callers:
        caller.start()
    for row in rows:
        assert row.done.wait(600), "a row never ended"
    assert all(len(r.tokens) == settings.max_new_tokens for r in rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "mixtral"), default="tiny")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model = build(args.model, device)
    print(f"model {args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, built in "
          f"{time.perf_counter() - started:.0f} s)", flush=True)
    engine = Stepper(model, eos_id=2, context_window=model.config.max_position_embeddings)
    scheduler = TransformersEngine(lambda: engine, max_batch=args.callers)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 32000, (args.prompt_tokens - i,), generator=generator).tolist()
               for i in range(args.callers)]  # slightly different lengths, as real callers have
    settings = SamplingSettings(max_new_tokens=args.new_tokens, ignore_eos=True)
    n = args.new_tokens

    hf_generate(model, prompts[:2], 4)  # warm-up
    crowd(scheduler, prompts[:2], SamplingSettings(max_new_tokens=4, ignore_eos=True))

    results: dict[str, float] = {}
    results["generate_batched_s"] = timed(lambda: hf_generate(model, prompts, n))
    results["generate_single_s"] = timed(lambda: hf_generate(model, prompts[:1], n))
    rows: list[Row] = []
    results["engine_crowd_s"] = timed(lambda: rows.extend(crowd(scheduler, prompts, settings)))
    crowd_ttft = statistics.median(r.first_token_at - r.submitted_at for r in rows)
    alone: list[Row] = []
    results["engine_sequential_s"] = timed(lambda: [alone.extend(crowd(scheduler, [p], settings)) for p in prompts])
    single_ttft = statistics.median(r.first_token_at - r.submitted_at for r in alone)
    single_s = results["engine_sequential_s"] / len(prompts)

    total = len(prompts) * n
    report = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "callers": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": n,
        **{k: round(v, 3) for k, v in results.items()},
        "generate_batched_tokens_per_s": round(total / results["generate_batched_s"], 1),
        "engine_crowd_tokens_per_s": round(total / results["engine_crowd_s"], 1),
        "engine_sequential_tokens_per_s": round(total / results["engine_sequential_s"], 1),
        "generate_single_tokens_per_s": round(n / results["generate_single_s"], 1),
        "crowd_vs_batched_generate": round(results["generate_batched_s"] / results["engine_crowd_s"], 3),
        "crowd_vs_sequential": round(results["engine_sequential_s"] / results["engine_crowd_s"], 3),
        "single_vs_generate_time": round(single_s / results["generate_single_s"], 3),
        "ttft_1_caller_s": round(single_ttft, 4),
        f"ttft_{len(prompts)}_callers_s": round(crowd_ttft, 4),
    }
    if args.model == "mixtral":
        bound = H200_BANDWIDTH / (2 * ACTIVE_PARAMETERS)
        report["bandwidth_bound_tokens_per_s_batch1"] = round(bound, 1)
        report["generate_single_vs_bound"] = round(report["generate_single_tokens_per_s"] / bound, 3)
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(report, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"engine-{args.model}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
