"""GPU benchmark: both engines and raw vLLM on Mixtral-8x7B's real config, random bf16 weights.

    .venv/bin/python bench/gpu.py                  # on one 141 GB H200 (93 GB of weights)
    .venv/bin/python bench/gpu.py --config tiny    # the same script on a shrunken config (a CPU check)

Tokens/s at batch 1, 8, 32, 64 and 256 (greedy, `ignore_eos`, --new-tokens each), next to the
memory-bandwidth bound of batch 1 (2 bytes x 12.9 B active parameters per token); and raw vLLM on FP8
weights (compressed-tensors, as neuralmagic's Mixtral FP8 is laid out: the one-GPU path), dummy too.
No 93 GB checkpoint is written (the device has 64 GiB of disk): our engine builds its random weights
in GPU memory, and vLLM loads `load_format="dummy"` weights from a folder holding only config.json. Each side runs in
its own process, one after the other: the two do not fit in one GPU together, and vLLM keeps its state
per process. Our engine is measured with each experts kernel transformers has (`grouped_mm`,
`batched_mm`), as the design brief asks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_endpoint.engines.engine import Engine, Row  # noqa: E402
from mixtral_endpoint.protocol.sampling import SamplingSettings  # noqa: E402

ACTIVE_PARAMETERS = 12.9e9  # Mixtral-8x7B, per token: 2 of 8 experts plus the shared layers
H200_BANDWIDTH = 4.8e12  # bytes/s, the data sheet's HBM3e figure
BATCHES = (1, 8, 32, 64, 256)
PROMPT_TOKENS = 128


def config(kind: str, fp8: bool = False) -> dict:
    from mixtral_endpoint.model.checkpoint import MIXTRAL_8X7B_CONFIG, MIXTRAL_FP8_QUANTIZATION_CONFIG
    from mixtral_endpoint.model.tiny import TINY_SIZES

    real = {k: v for k, v in MIXTRAL_8X7B_CONFIG.items() if k not in ("torch_dtype",)}
    chosen = real if kind == "mixtral" else {**real, **TINY_SIZES}
    return {**chosen, "quantization_config": MIXTRAL_FP8_QUANTIZATION_CONFIG} if fp8 else chosen


def prompts(batch: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 31000 + 100 for j in range(PROMPT_TOKENS)] for i in range(batch)]


def ours(kind: str, new_tokens: int, experts: str) -> dict[str, float]:
    """Our engine in this process: TransformersEngine over a Stepper on random bf16 weights."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from mixtral_endpoint.engines.transformers.stepper import Stepper
    from mixtral_endpoint.engines.transformers.transformers_engine import TransformersEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def build() -> Stepper:
        settings = {k: v for k, v in config(kind).items() if k != "model_type"}
        with torch.device("meta"):
            model = MixtralForCausalLM(MixtralConfig(**settings)).to(torch.bfloat16)
        model = model.to_empty(device=device)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, 0.02)
        model.set_experts_implementation(experts)
        return Stepper(model.eval(), eos_id=2, context_window=settings["max_position_embeddings"])

    return throughputs(TransformersEngine(build, max_batch=max(BATCHES)), new_tokens)


def throughputs(engine: Engine, new_tokens: int) -> dict[str, float]:
    """Tokens/s at each batch size; closes the engine."""
    results = {}
    for batch in BATCHES:
        run(engine, prompts(batch)[:1], 4)  # warm-up
        results[f"batch_{batch}"] = round(batch * new_tokens / run(engine, prompts(batch), new_tokens), 1)
    engine.close()
    return results


def run(engine: Engine, ids: list[list[int]], new_tokens: int) -> float:
    """Seconds for the engine to generate `new_tokens` for every prompt, submitted together."""
    rows = [Row(p, SamplingSettings(max_new_tokens=new_tokens, ignore_eos=True)) for p in ids]
    start = time.perf_counter()
    engine.submit(rows)
    for row in rows:
        assert row.done.wait(1800) and row.finish_reason == "length", row.finish_reason
    return time.perf_counter() - start


def vllm_args(kind: str, folder: Path, fp8: bool = False) -> dict:
    import torch

    (folder / "config.json").write_text(json.dumps(config(kind, fp8)))
    args = {"model": str(folder), "load_format": "dummy", "skip_tokenizer_init": True, "generation_config": "vllm",
            "dtype": "bfloat16", "max_model_len": 4096, "max_num_seqs": max(BATCHES), "seed": 0,
            "tensor_parallel_size": max(torch.cuda.device_count(), 1), "disable_log_stats": True}
    if not torch.cuda.is_available():  # the CPU check: eager, and a KV cache of its own size
        args.update(enforce_eager=True, kv_cache_memory_bytes=512 * 2**20)
    return args


def raw_vllm(kind: str, new_tokens: int, fp8: bool = False) -> dict[str, float]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(**vllm_args(kind, Path(tmp), fp8))
    results = {}
    for batch in BATCHES:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        requests = [{"prompt_token_ids": p} for p in prompts(batch)]
        llm.generate(requests[:1], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        results[f"batch_{batch}"] = round(batch * new_tokens / (time.perf_counter() - start), 1)
    return results


def vllm_engine(kind: str, new_tokens: int) -> dict[str, float]:
    """Our VllmEngine (the server's engine thread and rows) over the same dummy weights."""
    from mixtral_endpoint.engines.vllm_engine import VllmEngine, _build_llm_engine

    with tempfile.TemporaryDirectory() as tmp:
        args = vllm_args(kind, Path(tmp))
        engine = VllmEngine(lambda: _build_llm_engine(args, own_process=True), eos_id=2,
                            context_window=args["max_model_len"], vocab_size=config(kind)["vocab_size"],
                            max_num_seqs=args["max_num_seqs"])
    return throughputs(engine, new_tokens)


PHASES = {"ours-grouped_mm": lambda a: ours(a.config, a.new_tokens, "grouped_mm"),
          "ours-batched_mm": lambda a: ours(a.config, a.new_tokens, "batched_mm"),
          "raw-vllm": lambda a: raw_vllm(a.config, a.new_tokens),
          "raw-vllm-fp8": lambda a: raw_vllm(a.config, a.new_tokens, fp8=True),
          "vllm-engine": lambda a: vllm_engine(a.config, a.new_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("mixtral", "tiny"), default="mixtral")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--phase", choices=PHASES, help="run one side in this process (the parent runs all)")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    report: dict[str, object] = {"config": args.config, "new_tokens": args.new_tokens}
    for phase in PHASES:
        done = subprocess.run([sys.executable, __file__, "--config", args.config, "--new-tokens",
                               str(args.new_tokens), "--phase", phase], capture_output=True, text=True)
        report[phase] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
            f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
        print(phase, report[phase], flush=True)
    if args.config == "mixtral":
        report["bandwidth_bound_batch_1"] = round(H200_BANDWIDTH / (2 * ACTIVE_PARAMETERS), 1)
    print(json.dumps(report, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"gpu-{args.config}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
