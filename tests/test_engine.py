"""Engine tier, on the tiny Mixtral: our step-level engine, token ids in, token ids and finish reasons out."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import xgrammar
from transformers import GenerationConfig, MixtralForCausalLM

from mixtral_endpoint.engines.engine import Row
from mixtral_endpoint.engines.transformers.stepper import Stepper
from mixtral_endpoint.model.tokenizer import PromptTokenizer
from mixtral_endpoint.protocol.sampling import SamplingSettings

GREEDY = SamplingSettings(max_new_tokens=24)
SAMPLED = SamplingSettings(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95, seed=11)
TEXTS = ["Once upon a time", "The capital of France is", "x", "Ünïcødé ✓ 日本語 and a much longer prompt here"]


@pytest.fixture(scope="module")
def prompts(tokenizer: PromptTokenizer) -> list[list[int]]:
    return [tokenizer.encode_text(t) for t in TEXTS]


@pytest.fixture
def eos_forced(stepper: Stepper) -> Iterator[Stepper]:
    """The same model with EOS made the top token at every step."""

    def push_eos(module: torch.nn.Module, args: object, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., stepper.eos_id] += 1e4
        return logits

    handle = stepper.model.lm_head.register_forward_hook(push_eos)
    yield stepper
    handle.remove()


def test_greedy_tokens_match_transformers_generate(stepper: Stepper, reference_model: MixtralForCausalLM,
                                                  prompts: list[list[int]]):
    for prompt in prompts:
        ids = torch.tensor([prompt])
        direct = reference_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=
                                       GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=2,
                                                        pad_token_id=2))
        expected = direct[0, len(prompt):].tolist()
        assert list(stepper.generate([prompt], GREEDY)[0].token_ids) == expected


def test_batched_and_unbatched_greedy_give_identical_tokens(stepper: Stepper, prompts: list[list[int]]):
    batched = stepper.generate(prompts, GREEDY)
    alone = [stepper.generate([p], GREEDY)[0] for p in prompts]
    assert batched == alone


def test_seed_reproducibility(stepper: Stepper, prompts: list[list[int]]):
    first = stepper.generate(prompts, SAMPLED)
    assert stepper.generate(prompts, SAMPLED) == first
    other = stepper.generate(prompts, replace(SAMPLED, seed=12))
    assert other != first


def test_sampling_differs_from_greedy(stepper: Stepper, prompts: list[list[int]]):
    assert stepper.generate(prompts, SAMPLED) != stepper.generate(prompts, GREEDY)


def test_a_vanishing_temperature_samples_the_greedy_tokens(stepper: Stepper, prompts: list[list[int]]):
    assert stepper.generate(prompts, replace(SAMPLED, temperature=1e-300)) == stepper.generate(prompts, GREEDY)


def test_extreme_but_valid_settings_still_generate(stepper: Stepper, prompts: list[list[int]]):
    for settings in (replace(SAMPLED, repetition_penalty=1e-300), replace(GREEDY, repetition_penalty=1e-300),
                     replace(SAMPLED, temperature=100.0, top_p=1e-9), replace(SAMPLED, top_k=10**9)):
        settings = replace(settings, ignore_eos=True)
        assert all(len(g.token_ids) == settings.max_new_tokens for g in stepper.generate(prompts, settings))


def test_top_k_one_sampling_is_greedy(stepper: Stepper, prompts: list[list[int]]):
    top1 = replace(SAMPLED, top_k=1, top_p=1.0)
    assert stepper.generate(prompts, top1) == stepper.generate(prompts, GREEDY)


@pytest.mark.parametrize("max_new_tokens", [1, 5, 17])
def test_max_tokens_respected(stepper: Stepper, prompts: list[list[int]], max_new_tokens: int):
    for generation in stepper.generate(prompts, replace(GREEDY, max_new_tokens=max_new_tokens)):
        assert len(generation.token_ids) == max_new_tokens
        assert generation.finish_reason == "length"


def test_repetition_penalty_changes_the_tokens(stepper: Stepper, prompts: list[list[int]]):
    assert stepper.generate(prompts, replace(GREEDY, repetition_penalty=5.0)) != stepper.generate(prompts, GREEDY)


def test_eos_ends_generation_with_stop(eos_forced: Stepper, prompts: list[list[int]]):
    for generation in eos_forced.generate(prompts, GREEDY):
        assert generation.token_ids == (eos_forced.eos_id,)
        assert generation.finish_reason == "stop"


def test_ignore_eos_generates_to_max_new_tokens(eos_forced: Stepper, prompts: list[list[int]]):
    for generation in eos_forced.generate(prompts, replace(GREEDY, ignore_eos=True)):
        assert len(generation.token_ids) == GREEDY.max_new_tokens
        assert generation.finish_reason == "length"


def test_stepper_rejects_prompts_over_the_context_window(stepper: Stepper):
    with pytest.raises(AssertionError):
        stepper.generate([[1] * stepper.context_window], GREEDY)


def test_sampling_settings_check_their_own_invariants():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1},
                {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingSettings(**{"max_new_tokens": 4, **bad})


def run_with_late_joiner(stepper: Stepper, first: list[int], second: list[int], settings: SamplingSettings,
                         join_after: int) -> tuple[Row, Row]:
    a, b = Row(first, settings), Row(second, settings)
    batch = stepper.prefill([a])
    for _ in range(join_after):
        batch = stepper.step(batch)
    batch = stepper.join(batch, stepper.prefill([b]))
    while batch is not None:
        batch = stepper.step(batch)
    return a, b


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_row_joining_mid_flight_gets_the_same_tokens_as_alone(stepper: Stepper, prompts: list[list[int]],
                                                                settings: SamplingSettings):
    for first, second in ((prompts[0], prompts[3]), (prompts[3], prompts[2])):
        a, b = run_with_late_joiner(stepper, first, second, settings, join_after=5)
        assert a.generation == stepper.generate([first], settings)[0]
        assert b.generation == stepper.generate([second], settings)[0]


def test_rows_with_different_settings_share_a_batch(stepper: Stepper, prompts: list[list[int]]):
    mixed = [GREEDY, SAMPLED, replace(SAMPLED, seed=99, temperature=0.5, top_k=20), replace(GREEDY, max_new_tokens=3)]
    rows = [Row(p, s) for p, s in zip(prompts, mixed, strict=True)]
    batch = stepper.prefill(rows)
    while batch is not None:
        batch = stepper.step(batch)
    for row, prompt, settings in zip(rows, prompts, mixed, strict=True):
        assert row.generation == stepper.generate([prompt], settings)[0]


def test_deadline_ends_a_row_with_time_limit(stepper: Stepper, prompts: list[list[int]]):
    row = Row(prompts[0], replace(GREEDY, max_new_tokens=50), deadline=0.0)
    assert stepper.prefill([row]) is None
    assert row.finish_reason == "time_limit" and len(row.tokens) == 1


def test_a_token_the_grammar_refuses_never_reaches_the_caller(stepper: Stepper, scorer, prompts, monkeypatch):
    """Should a matcher refuse what its own mask allowed, the row fails without that token emitted."""
    from mixtral_endpoint.engines.transformers import stepper as stepper_module
    from mixtral_endpoint.protocol.constraints import Constraint

    class Refusing(xgrammar.GrammarMatcher):
        def accept_token(self, token_id: int, *, debug_print: bool = False) -> bool:
            return False

    monkeypatch.setattr(stepper_module.xgrammar, "GrammarMatcher", Refusing)
    constraint = Constraint("regex", "[a-z]+")
    sink: queue.SimpleQueue = queue.SimpleQueue()
    row = Row(prompts[0], replace(GREEDY, constraint=constraint), sink=sink,
              grammar=scorer.grammars.compile(constraint))
    assert stepper.prefill([row]) is None
    assert row.finish_reason == "error" and row.tokens == [] and sink.get_nowait() == (row, None)
