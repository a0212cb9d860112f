"""xgrammar against the real v1 vocabulary: every constraint kind compiles once, and a decode loop that picks
only allowed tokens ends in text that obeys it. Pure logic: random logits, no model."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from mixtral_endpoint.engines.grammar import Grammars, grammar, mask
from mixtral_endpoint.model.tokenizer import PromptTokenizer
from mixtral_endpoint.protocol.constraints import Constraint

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}


@pytest.fixture(scope="module")
def grammars(tokenizer: PromptTokenizer) -> Grammars:
    return Grammars(tokenizer)


def decode(grammars: Grammars, tokenizer: PromptTokenizer, constraint: Constraint, seed: int, *,
           must_end: bool = True) -> str:
    """Random logits, masked to what the grammar allows, argmax, until the grammar ends (or 200 tokens)."""
    matcher = xgrammar.GrammarMatcher(grammars.compile(constraint))
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(200):
        logits = torch.randn(1, tokenizer.vocab_size, generator=generator)
        mask(logits, [matcher])
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            break
        tokens.append(token)
    assert matcher.is_terminated() or not must_end, "the grammar never ended"
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("seed", range(5))
def test_a_bounded_schema_gives_json_that_validates(grammars, tokenizer, seed):
    text = decode(grammars, tokenizer, Constraint.json_schema(SCHEMA), seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_each_kind_of_constraint_is_obeyed(grammars, tokenizer):
    assert decode(grammars, tokenizer, Constraint.choice(["yes", "no", "maybe later"]), 0) in (
        "yes", "no", "maybe later")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", decode(grammars, tokenizer, Constraint("regex", r"[0-9]{3}-[a-z]{2}"), 1))
    any_object = grammars.compile(Constraint.json_schema({"type": "object"}))  # json_object: unbounded, so no loop
    assert xgrammar.GrammarMatcher(any_object).accept_string('{"a": [1, {"b": null}]}')
    assert not xgrammar.GrammarMatcher(any_object).accept_string("[1]")


@pytest.mark.parametrize("seed", range(3))
def test_or_text_gives_the_schema_or_text_that_does_not_open_like_json(grammars, tokenizer, seed):
    """tool_choice auto: the answer is a call that validates, or text; never half of each."""
    text = decode(grammars, tokenizer, Constraint.json_schema(SCHEMA, or_text=True), seed, must_end=False)
    if text[:1] in "[{":
        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert text and not text[0].isspace()


def test_a_schema_the_compiler_refuses_is_a_value_error_naming_it(grammars):
    with pytest.raises(ValueError, match=r"\S"):
        grammars.compile(Constraint("json_schema", '{"type": "no-such-type"}'))


@pytest.mark.parametrize("text", ["😀", "🚀x", "☃", "é\"\\", "a\nb\t\x00", "\U0010ffff"])
def test_a_choice_is_written_so_that_its_exact_code_points_match(text):
    """json.dumps would write an emoji as two surrogate escapes, which no UTF-8 text matches."""
    built = grammar(Constraint.choice([text, "other"]))
    assert accepts(built, text) and accepts(built, "other")
    assert not accepts(built, text + "x") and not accepts(built, text[:-1] or "z")


def test_the_compiled_grammars_kept_stay_within_the_budget(tokenizer):
    """xgrammar's compiler kept every grammar it compiled unless told a limit (805 MiB after 400 regexes)."""
    grammars = Grammars(tokenizer, budget_bytes=4 * 2**20)
    biggest = 0
    for n in range(20, 60):
        biggest = max(biggest, grammars.compile(Constraint("regex", f"[a-z]{{1,{n}}}")).memory_size_bytes)
        assert grammars.bytes <= grammars.budget_bytes + biggest  # xgrammar's: over by less than one grammar
    assert grammars.bytes > grammars.budget_bytes / 2  # what it keeps, it counts


def test_a_repeated_constraint_is_compiled_once(grammars):
    grammars.compile(Constraint.json_schema(SCHEMA))
    kept = grammars.bytes
    grammars.compile(Constraint.json_schema(dict(reversed(SCHEMA.items()))))  # the same schema
    assert grammars.bytes == kept


def test_a_slow_compilation_holds_up_no_other_constraint(tokenizer):
    """Compiled on the caller's thread, without the GIL and outside any lock of ours (one lock held every
    caller behind the slowest compilation)."""
    grammars = Grammars(tokenizer)
    slow = Constraint.json_schema({"type": "object", "properties": {  # strings of distinct lengths: ~1 s
        f"p{i}": {"type": "string", "maxLength": 100 + 7 * i} for i in range(6)}})
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        slow_done = pool.submit(lambda: (started.set(), grammars.compile(slow)))
        assert started.wait(timeout=30)
        time.sleep(0.05)
        grammars.compile(Constraint("regex", "[0-9]{1,5}"))
        assert not slow_done.done()
        slow_done.result(timeout=120)
