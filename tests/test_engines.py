"""Both engines behind one interface: the choice, vLLM's token parity with transformers, and death."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, MixtralForCausalLM

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.engines.choice import choose_engine
from mixtral_endpoint.engines.engine import Row
from mixtral_endpoint.engines.transformers.transformers_engine import TransformersEngine
from mixtral_endpoint.engines.vllm_engine import VllmEngine, sampling_params
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import ConfigError, ModelNotReady
from mixtral_endpoint.protocol.sampling import SamplingSettings
from mixtral_endpoint.serving.service import Scorer

TEXTS = ["Once upon a time", "The capital of France is", "x", "Ünïcødé ✓ 日本語 and a much longer prompt here"]


def text(prompt: str, **parameters: object) -> dict:
    return {"input_data": {"input_string": [prompt]}, "parameters": {"return_token_ids": True, **parameters}}


@pytest.mark.parametrize(("wanted", "gpus", "installed", "chosen"), [
    ("auto", 0, True, "transformers"), ("auto", 2, True, "vllm"), ("auto", 2, False, "transformers"),
    ("transformers", 8, True, "transformers"), ("vllm", 0, True, "vllm"),
])
def test_auto_takes_vllm_only_with_a_gpu_and_vllm(wanted: str, gpus: int, installed: bool, chosen: str):
    choice = choose_engine(wanted, gpus=gpus, vllm_installed=installed)
    assert choice.name == chosen and wanted in choice.why


def test_asking_for_vllm_where_it_is_not_installed_is_an_error_not_a_fallback():
    with pytest.raises(ConfigError, match="not installed"):
        choose_engine("vllm", gpus=1, vllm_installed=False)


def test_a_typo_in_the_engine_setting_names_the_values_allowed():
    with pytest.raises(ConfigError, match="MIXTRAL_ENGINE must be one of auto, transformers, vllm"):
        ServerConfig.from_env({"MIXTRAL_ENGINE": "vlm"})


def test_each_rows_settings_become_its_sampling_params():
    greedy = sampling_params(SamplingSettings(max_new_tokens=5, temperature=0.7, seed=3), eos_id=2)
    assert (greedy.temperature, greedy.seed, greedy.max_tokens, greedy.stop_token_ids) == (0.0, None, 5, [2])
    sampled = sampling_params(SamplingSettings(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=0.9, top_k=40,
                                               repetition_penalty=1.3, seed=3, ignore_eos=True), eos_id=2)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.repetition_penalty, sampled.seed) == (
        0.7, 0.9, 40, 1.3, 3)
    assert sampled.ignore_eos and sampled.stop_token_ids == []


def test_vllm_greedy_tokens_equal_transformers_generate(vllm_scorer: Scorer, reference_model: MixtralForCausalLM):
    for prompt in TEXTS:
        ids = vllm_scorer.tokenizer.encode_text(prompt)
        direct = reference_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                        generation_config=GenerationConfig(max_new_tokens=24, do_sample=False,
                                                                           eos_token_id=2, pad_token_id=2))
        (row,) = score_api.score(vllm_scorer, text(prompt, max_new_tokens=24))
        assert row["prompt_token_ids"] == ids
        assert row["token_ids"] == direct[0, len(ids):].tolist()


@pytest.mark.parametrize("parameters", [{"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 5},
                                        {"do_sample": True, "temperature": 1.2, "top_k": 30, "seed": 6,
                                         "repetition_penalty": 1.2}])
def test_a_seeded_request_gives_the_same_sample_alone_and_in_a_crowd(any_scorer: Scorer, parameters: dict, caplog):
    seeded = text("Once upon a time", max_new_tokens=20, **parameters)
    alone = score_api.score(any_scorer, seeded)
    crowd = [text(f"neighbour {i}", max_new_tokens=60, do_sample=True, ignore_eos=True) for i in range(5)]
    answers: list[object] = []
    threads = [threading.Thread(target=lambda p=p: answers.append(score_api.score(any_scorer, p))) for p in crowd]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while any_scorer.line.counts[0] < len(crowd) and time.monotonic() < deadline:
        time.sleep(0.001)
    with caplog.at_level(logging.INFO, logger="mixtral_endpoint.serving.service"):
        assert score_api.score(any_scorer, seeded, request_id="seeded-in-a-crowd") == alone
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == len(crowd)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request=seeded-in-a-crowd ")]
    assert int(re.search(r" batch=(\d+)", line).group(1)) > 1  # it did share its batch


def test_a_row_the_vllm_engine_refuses_fails_alone(vllm_scorer: Scorer):
    engine = vllm_scorer.engine
    bad = Row([1, 10**9], SamplingSettings(max_new_tokens=3))  # a token id past the vocabulary
    good = Row(vllm_scorer.tokenizer.encode_text("hi"), SamplingSettings(max_new_tokens=3))
    engine.submit([bad, good])
    assert bad.done.wait(60) and good.done.wait(60)
    assert bad.finish_reason == "error" and good.finish_reason == "length" and len(good.tokens) == 3


class DyingLLM:
    """A stand-in for vLLM's LLMEngine whose step fails: for the death path, which is pure logic."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=64, block_size=16))

    def add_request(self, request_id: str, prompt: dict, params: object) -> None:
        pass

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    def step(self) -> list:
        raise RuntimeError("EngineDeadError: the engine core died")


def test_a_dead_vllm_engine_fails_every_row_and_refuses_new_ones():
    engine = VllmEngine(DyingLLM, eos_id=2, context_window=512, vocab_size=32000, max_num_seqs=8)
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    rows = [Row([1, 2, 3], SamplingSettings(max_new_tokens=4)) for _ in range(3)]
    engine.submit(rows)
    assert all(row.done.wait(30) for row in rows)
    assert {row.finish_reason for row in rows} == {"error"} and len(deaths) == 1
    with pytest.raises(ModelNotReady):
        engine.submit([Row([1], SamplingSettings(max_new_tokens=1))])


def test_a_dead_transformers_engine_fails_every_row_and_calls_on_death(tiny_checkpoint: Path, checkpoint):
    config = ServerConfig.from_env({"MIXTRAL_ENGINE": "transformers", "MIXTRAL_MAX_TOTAL_TOKENS": "512"})
    engine = TransformersEngine.load(checkpoint, config)
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    engine._worth_a_prefill = lambda room: 1 / 0  # a bug outside prefill and step
    rows = [Row([1, 2, 3], SamplingSettings(max_new_tokens=200, ignore_eos=True)) for _ in range(2)]
    engine.submit(rows[:1])
    engine.submit(rows[1:])  # arrives while the first generates: the admission check dies
    assert all(row.done.wait(60) for row in rows)
    assert {row.finish_reason for row in rows} == {"error"} and isinstance(deaths[0], ZeroDivisionError)
    with pytest.raises(ModelNotReady):
        engine.submit([Row([1], replace(rows[0].settings, max_new_tokens=1))])


def test_close_ends_rows_in_flight_and_stops_the_thread(checkpoint):
    config = ServerConfig.from_env({"MIXTRAL_ENGINE": "transformers", "MIXTRAL_MAX_TOTAL_TOKENS": "512"})
    engine = TransformersEngine.load(checkpoint, config)
    row = Row([1, 2, 3], SamplingSettings(max_new_tokens=200, ignore_eos=True))
    engine.submit([row])
    engine.close()
    assert row.done.is_set() and row.finish_reason in ("cancelled", "length")
    assert not engine._thread.is_alive() and not hasattr(engine, "stepper")


def test_loads_of_the_same_model_in_one_process_share_the_vllm_engine(vllm_scorer: Scorer, tiny_checkpoint: Path):
    """vLLM's parallel state is per process: a second load (Spark loads the model once per UDF) shares the
    engine, and the first scorer's engine keeps serving after the second closes."""
    again = Scorer.load(tiny_checkpoint, vllm_scorer.config)
    assert again.engine is vllm_scorer.engine
    again.close()
    request = text("Once upon a time", max_new_tokens=4)
    assert score_api.score(vllm_scorer, request)[0]["usage"]["completion_tokens"] == 4
    other = replace(vllm_scorer.config, max_batch_size=2, max_queue=4, max_prompts=2)
    with pytest.raises(ConfigError, match="other settings"):
        Scorer.load(tiny_checkpoint, other)
