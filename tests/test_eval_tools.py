"""lm-evaluation-harness against the live server on each engine, as people score a freshly deployed endpoint,
offline, over the small tasks in tests/eval_tasks/: `local-completions` (token-id prompts, loglikelihoods from
echoed prompt logprobs, generations with the task's stop strings plus the EOS string) and
`local-chat-completions` (generations through chat). lm-eval runs in its own process through
tests/tools/lm_eval_run.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import MixtralForCausalLM

from mixtral_endpoint.protocol.config import MODEL_NAME

TASKS = Path(__file__).parent / "eval_tasks"
LM_EVAL_RUN = Path(__file__).parent / "tools" / "lm_eval_run.py"
# lm-eval's documented batch is 16 prompts per request; the test server takes 4 (conftest.SERVER_ENV).
BATCH = 4
WINDOW = 512  # conftest.SERVER_ENV's MIXTRAL_MAX_TOTAL_TOKENS
LOGPROB_TOLERANCE = 1e-3


def run_lm_eval(tmp_path: Path, *, model: str, model_args: dict[str, Any], tasks: list[str],
                batch_size: int = 1, chat: bool = False) -> dict[str, Any]:
    """lm-eval's results with its per-sample records, from a process with no way to a hub (HF_*_OFFLINE, an
    empty HF_HOME); a failed run fails the test with every distinct answer the server refused it."""
    out = tmp_path / "lm_eval.json"
    command = [sys.executable, str(LM_EVAL_RUN), "--model", model, "--model-args", json.dumps(model_args),
               "--tasks", *tasks, "--batch-size", str(batch_size), "--out", str(out),
               *(["--apply-chat-template"] if chat else [])]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True, timeout=180)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"lm-eval failed; the server answered:\n{_refusals(output)}\n{output[-2000:]}"
    return json.loads(out.read_text())


def _refusals(output: str) -> str:
    """The distinct error bodies lm-eval logged ("API request failed with error message: ...")."""
    found = re.findall(r"API request failed with error message: (.*?)\. Retrying", output)
    return "\n".join(dict.fromkeys(found)) or "(no error body logged)"


def reference_loglikelihood(model: MixtralForCausalLM, context: list[int], continuation: list[int]
                            ) -> tuple[float, bool]:
    """log P(continuation | context) from transformers' float32 forward over exactly these ids, and whether
    greedy decoding would give the continuation: what lm-eval's (loglikelihood, is_greedy) should be."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # [len(ids), vocab]
    rows = logprobs[len(context) - 1:-1]  # row i predicts continuation[i]
    target = torch.tensor(continuation)
    return rows[torch.arange(len(continuation)), target].sum().item(), bool((rows.argmax(-1) == target).all())


def test_lm_eval_local_completions_loglikelihoods_are_the_models_own(any_server: tuple[str, Path],
                                                                      reference_model: MixtralForCausalLM,
                                                                      tmp_path: Path) -> None:
    """lm-eval's `local-completions` scores a multiple-choice task from `echo` + `logprobs` over token-id
    prompts, 4 to a request, with the server's own tokenizer (`/tokenizer_info`, `/tokenize`): every
    loglikelihood it computed equals a float32 transformers forward over the same ids, and its greedy flag
    (from `top_logprobs`) agrees. The same run generates over token-id prompts with the task's five stop
    strings plus the EOS string (six, past OpenAI's four), and scores every sample."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url, _ = any_server
    model_args = {"model": MODEL_NAME, "base_url": f"{url}/v1/completions", "tokenizer_backend": "remote",
                  "max_length": WINDOW, "max_retries": 1}
    results = run_lm_eval(tmp_path, model="local-completions", model_args=model_args,
                          tasks=["tiny_choice", "tiny_generate"], batch_size=BATCH)

    assert 0.0 <= results["results"]["tiny_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["tiny_generate"]["exact_match,none"] <= 1.0
    choice_samples, generate_samples = results["samples"]["tiny_choice"], results["samples"]["tiny_generate"]
    assert len(choice_samples) == _lines(TASKS / "tiny_choice.jsonl")
    assert len(generate_samples) == _lines(TASKS / "tiny_generate.jsonl")
    assert all(isinstance(sample["resps"][0][0], str) for sample in generate_samples)

    # The ids lm-eval sent, split as it split them (its tokenizer is the server's /tokenize, deterministic).
    lm = LocalCompletionsAPI(**model_args)
    for sample in choice_samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"]) == len(sample["resps"])
        for (context, continuation), ((loglikelihood, is_greedy),) in zip(sample["arguments"], sample["resps"],
                                                                         strict=True):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            expected, expected_greedy = reference_loglikelihood(reference_model, context_ids, continuation_ids)
            assert abs(loglikelihood - expected) < LOGPROB_TOLERANCE, (sample["doc"], continuation,
                                                                        loglikelihood, expected)
            assert is_greedy == expected_greedy, (sample["doc"], continuation)


def test_lm_eval_local_chat_completions_scores_every_generation(any_server: tuple[str, Path],
                                                                tmp_path: Path) -> None:
    """lm-eval's `local-chat-completions` (chat messages, the task's first four stop strings,
    `max_tokens`, `seed`) runs a generate_until task to the end and scores every sample (the tiny model's
    text is gibberish: only that it completes is asserted)."""
    url, _ = any_server
    model_args = {"model": MODEL_NAME, "base_url": f"{url}/v1/chat/completions", "max_retries": 1}
    results = run_lm_eval(tmp_path, model="local-chat-completions", model_args=model_args,
                          tasks=["tiny_generate"], chat=True)

    assert 0.0 <= results["results"]["tiny_generate"]["exact_match,none"] <= 1.0
    samples = results["samples"]["tiny_generate"]
    assert len(samples) == _lines(TASKS / "tiny_generate.jsonl")
    assert all(isinstance(sample["resps"][0][0], str) and "exact_match" in sample for sample in samples)


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())
