"""Batch benchmark: `mixtral-endpoint batch` vs a plain loop of batched transformers `generate` calls.

    .venv/bin/python bench/batch.py [--prompts 256] [--new-tokens 32] [--batch 8] [--repeat 2]

Both score the same prompts on the same tiny checkpoint with the same settings (greedy,
ignore_eos, so every prompt gets exactly --new-tokens tokens). The command runs as users run it,
in its own process; its own timer covers scoring (reading, tokenizing, generating, writing), not
the model load. The loop tokenizes with the same tokenizer and calls `generate` on chunks of
--batch prompts. Printed: throughput of the command as a fraction of the loop's (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_endpoint.doors.mlflow_model.packager import package_model  # noqa: E402
from mixtral_endpoint.model.tiny import build_tiny  # noqa: E402
from mixtral_endpoint.model.tokenizer import PromptTokenizer  # noqa: E402

BIN = Path(sys.executable).parent
SUBJECTS = ["the sea", "a lighthouse", "Paris in spring", "mixture-of-experts models", "a quiet library",
            "the first moon landing", "a recipe for bread", "Azure Machine Learning", "an old clock"]


def prompts(n: int) -> list[str]:
    return [f"Write {i % 5 + 1} sentences about {SUBJECTS[i % len(SUBJECTS)]}, number {i}:" for i in range(n)]


def plain_loop(checkpoint: Path, texts: list[str], new_tokens: int, batch: int) -> float:
    tokenizer = PromptTokenizer(checkpoint / "tokenizer.model")
    model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], pad_token_id=2)
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        ids = [tokenizer.encode_text(t) for t in texts[i: i + batch]]
        width = max(len(p) for p in ids)
        input_ids = torch.tensor([[2] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        [tokenizer.decode(row[width:]) for row in out.tolist()]
    return time.perf_counter() - start


def batch_command(model_dir: Path, source: Path, output: Path, batch: int) -> dict:
    output.unlink(missing_ok=True)
    done = subprocess.run(
        [str(BIN / "mixtral-endpoint"), "batch", str(source), "--output", str(output), "--model", str(model_dir),
         "--no-progress"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "MIXTRAL_MAX_BATCH_SIZE": str(batch), "MIXTRAL_MAX_QUEUE": str(2 * batch)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny(Path(tmp) / "tiny-mixtral")
        model_dir = package_model(checkpoint, Path(tmp) / "model")
        source = Path(tmp) / "prompts.jsonl"
        source.write_text("".join(json.dumps({"id": i, "input_data": {"input_string": [t]}, "parameters": {
            "max_new_tokens": args.new_tokens, "ignore_eos": True}}) + "\n" for i, t in enumerate(texts)))
        loop_s, command_s = [], []
        for _ in range(args.repeat):
            loop_s.append(plain_loop(checkpoint, texts, args.new_tokens, args.batch))
            summary = batch_command(model_dir, source, Path(tmp) / "out.jsonl", args.batch)
            assert summary["rows"] == args.prompts and summary["errors"] == 0, summary
            command_s.append(summary["seconds"])
    tokens = args.prompts * args.new_tokens
    loop, command = statistics.median(loop_s), statistics.median(command_s)
    print(json.dumps({
        "machine": f"{torch.get_num_threads()} CPU threads", "prompts": args.prompts, "new_tokens": args.new_tokens,
        "batch": args.batch, "plain_loop_s": round(loop, 3), "batch_command_s": round(command, 3),
        "plain_loop_tokens_per_s": round(tokens / loop, 1), "batch_command_tokens_per_s": round(tokens / command, 1),
        "batch_command_vs_plain_loop_throughput": round(loop / command, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
