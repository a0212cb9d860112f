"""xgrammar against the real v1 vocabulary: every constraint kind compiles once, and a decode loop that picks
only allowed tokens ends in text that obeys it. Pure logic: random logits, no model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar

from mixtral_endpoint.grammar import Constraint, Grammars
from mixtral_endpoint.tokenizer import PromptTokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}


@pytest.fixture(scope="module")
def grammars(tokenizer: PromptTokenizer) -> Grammars:
    return Grammars(tokenizer)


def decode(grammars: Grammars, tokenizer: PromptTokenizer, constraint: Constraint, seed: int) -> str:
    """Random logits, masked to what the grammar allows, argmax, until the grammar ends."""
    matcher = grammars.matcher(constraint)
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(200):
        logits = torch.randn(1, tokenizer.vocab_size, generator=generator)
        xgrammar.apply_token_bitmask_inplace(logits, grammars.allowed(matcher))
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            break
        tokens.append(token)
    assert matcher.is_terminated(), "the grammar never ended"
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("seed", range(5))
def test_a_bounded_schema_gives_json_that_validates(grammars, tokenizer, seed):
    text = decode(grammars, tokenizer, Constraint.json_schema(SCHEMA), seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_each_kind_of_constraint_is_obeyed(grammars, tokenizer):
    assert decode(grammars, tokenizer, Constraint.choice(["yes", "no", "maybe later"]), 0) in (
        "yes", "no", "maybe later")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", decode(grammars, tokenizer, Constraint("regex", r"[0-9]{3}-[a-z]{2}"), 1))


def test_a_constraint_compiles_once(grammars):
    first = grammars.compile(Constraint.json_schema(SCHEMA))
    assert grammars.compile(Constraint.json_schema(dict(reversed(SCHEMA.items())))) is first  # same schema


def test_a_schema_the_compiler_refuses_is_a_value_error_naming_it(grammars):
    with pytest.raises(ValueError, match=r"\S"):
        grammars.compile(Constraint("json_schema", '{"type": "no-such-type"}'))
