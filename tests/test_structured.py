"""Structured outputs through the core, on each engine: every answer to a bounded constraint ends on its own
("stop") and obeys it, in a batch, on a stream, sampled or greedy; a schema no grammar can hold is a 400."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import jsonschema
import pytest
import xgrammar

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.engines.grammar import GRAMMAR_CACHE_BYTES, Grammars
from mixtral_endpoint.protocol.constraints import MAX_SCHEMA_DEPTH
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.serving.service import Scorer

# Bounded (enums, integer ranges, maxLength), so the tiny model's random text ends within max_new_tokens.
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 99},
                                           "note": {"type": "string", "maxLength": 8}},
          "required": ["city", "rank", "note"]}
CHAT = [{"role": "user", "content": "Name a city in France, as JSON."}]


def body(response_format: dict, *, prompts: list | None = None, **parameters: object) -> dict:
    return {"input_data": {"input_string": prompts or CHAT},
            "parameters": {"response_format": response_format, "max_new_tokens": 64, **parameters}}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.0, "seed": 3}])
def test_a_schema_constrains_each_answer_of_a_batch(any_scorer: Scorer, sampling: dict):
    results = score_api.score(any_scorer, body(json_schema(SCHEMA), prompts=["A", "Tell me", "Paris is"],
                                               **sampling))
    for result in results:
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["0"]), SCHEMA)


def test_regex_and_choice_are_obeyed(any_scorer: Scorer):
    regex = score_api.score(any_scorer, body({"type": "regex", "regex": r"[0-9]{3}-[a-z]{2}"}))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex["output"]) and regex["finish_reason"] == "stop"
    choice = score_api.score(any_scorer, body({"type": "choice", "choice": ["yes", "no", "maybe later"]},
                                              do_sample=True, seed=1))
    assert choice["output"] in ("yes", "no", "maybe later") and choice["finish_reason"] == "stop"


def test_a_constrained_stream_adds_up_to_valid_json(any_scorer: Scorer):
    events = list(score_api.score(any_scorer, body(json_schema(SCHEMA), stream=True), stream_ok=True))
    datas = [json.loads(e.removeprefix("data: ")) for e in "".join(events).split("\n\n") if e and "[DONE]" not in e]
    text = "".join(d.get("delta", "") for d in datas)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert datas[-1]["finish_reason"] == "stop"


def test_json_object_without_a_schema_is_parsed_from_the_request():
    request_format = {"type": "json_object"}
    from mixtral_endpoint.doors.score.protocol import parse_request
    from mixtral_endpoint.protocol.config import ServerConfig

    from .conftest import SERVER_ENV
    settings = parse_request(body(request_format), ServerConfig.from_env(SERVER_ENV).limits).settings
    assert settings.constraint is not None and json.loads(settings.constraint.value) == {"type": "object"}


@pytest.mark.parametrize(("schema", "param", "words"), [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
     "parameters.response_format.json_schema.schema.properties.a", "'not'"),
    ({"type": "object", "properties": {"a": {"type": "nonsense"}}},
     "parameters.response_format.json_schema.schema.properties.a.type", "not a valid JSON schema"),
    ({"type": "string", "pattern": "(?<=a)b"}, "parameters.response_format.json_schema.schema", "Lookbehind"),
])
def test_a_schema_no_grammar_can_hold_is_a_400_naming_field_and_keyword(any_scorer: Scorer, schema, param, words):
    with pytest.raises(InvalidRequest) as caught:
        score_api.score(any_scorer, body(json_schema(schema)))
    assert caught.value.param == param and words in caught.value.message, caught.value.message


def test_a_type_without_its_field_is_a_400_naming_it(scorer: Scorer):
    with pytest.raises(InvalidRequest) as caught:
        score_api.score(scorer, body({"type": "regex"}))
    assert caught.value.param == "parameters.response_format.regex"


def test_a_repeated_schema_compiles_once(scorer: Scorer):
    score_api.score(scorer, body(json_schema(SCHEMA)))
    kept = scorer.grammars.bytes
    score_api.score(scorer, body(json_schema(dict(reversed(SCHEMA.items())))))
    assert scorer.grammars.bytes == kept


EMOJI = ["😀", "🚀", "☃"]


@pytest.mark.parametrize("response_format", [
    {"type": "choice", "choice": EMOJI},
    {"type": "regex", "regex": "(😀|🚀|☃)"},
    json_schema({"enum": EMOJI}),
], ids=["choice", "regex", "enum"])
def test_a_greedy_choice_among_emoji_gives_exactly_one_of_them(any_scorer: Scorer, response_format: dict):
    """Characters past U+FFFF, as the caller wrote them (the choice grammar once spelled them as surrogates)."""
    result = score_api.score(any_scorer, body(response_format))
    answer = json.loads(result["output"]) if response_format["type"] == "json_schema" else result["output"]
    assert answer in EMOJI and result["finish_reason"] == "stop", result


def test_a_schema_200_deep_is_a_400_naming_the_field(any_scorer: Scorer):
    """Not a RecursionError (a 500, a thousand frames in the log) in the schema check."""
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(InvalidRequest) as caught:
        score_api.score(any_scorer, body(json_schema(deep)))
    assert caught.value.param == "parameters.response_format.json_schema.schema"
    assert str(MAX_SCHEMA_DEPTH) in caught.value.message


def test_a_schema_as_deep_as_the_limit_allows_is_served(any_scorer: Scorer):
    deepest: dict = {"enum": [1]}  # nested in arrays of at most one item: [[[...[1]...]]] or less
    for _ in range(MAX_SCHEMA_DEPTH - 2):
        deepest = {"type": "array", "items": deepest, "maxItems": 1}
    result = score_api.score(any_scorer, body(json_schema(deepest)))
    if result["finish_reason"] == "stop":
        jsonschema.validate(json.loads(result["output"]), deepest)


def distinct_regexes(count: int) -> list[str]:
    """Never-seen regexes, each compiling to about 0.9 MB on the v1 vocabulary (sharing most of it)."""
    return [f"{time.time_ns()}{i}[a-z0-9 ]{{1,20}}" for i in range(count)]


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_400_new_regexes_in_a_row_leave_the_grammar_cache_within_its_budget(scorer: Scorer,
                                                                               monkeypatch: pytest.MonkeyPatch):
    """Each distinct constraint was kept for the life of the process (805 MiB after 400 such requests); now the
    cache drops the least recently used past its budget, here a small one so the test sees it work."""
    assert scorer.grammars.budget_bytes == GRAMMAR_CACHE_BYTES
    grammars = Grammars(scorer.tokenizer, budget_bytes=64 * 2**20)
    monkeypatch.setattr(scorer, "grammars", grammars)
    before = resident_mib()
    for regex in distinct_regexes(400):
        result = score_api.score(scorer, body({"type": "regex", "regex": regex}, max_new_tokens=1))
        assert result["finish_reason"] in ("stop", "length")
        assert grammars.bytes <= grammars.budget_bytes + 2**20  # xgrammar's: over by less than one grammar
    assert resident_mib() - before < 64 + 96, "the grammars dropped from the cache were not freed"


def test_vllm_compiles_each_constraint_once_and_keeps_its_grammars_bounded(vllm_scorer: Scorer,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """On vLLM the core only checks a constraint and writes its EBNF text (on the request's thread); vLLM
    compiles it, once, into its own cache, which has our budget."""
    assert vllm_scorer.grammars is None
    compiled = []
    real = xgrammar.GrammarCompiler.compile_grammar
    monkeypatch.setattr(xgrammar.GrammarCompiler, "compile_grammar",
                        lambda self, *args, **kwargs: compiled.append(args) or real(self, *args, **kwargs))
    score_api.score(vllm_scorer, body({"type": "regex", "regex": distinct_regexes(1)[0]}, max_new_tokens=1))
    assert len(compiled) == 1
    vllm_compiler = vllm_scorer.engine.llm.engine_core.engine_core.structured_output_manager.backend.compiler
    assert vllm_compiler.cache_limit_bytes == GRAMMAR_CACHE_BYTES
    before = resident_mib()
    for regex in distinct_regexes(400):
        result = score_api.score(vllm_scorer, body({"type": "regex", "regex": regex}, max_new_tokens=1))
        assert result["finish_reason"] in ("stop", "length")
    assert vllm_compiler.get_cache_size_bytes() <= GRAMMAR_CACHE_BYTES
    assert resident_mib() - before < GRAMMAR_CACHE_BYTES / 2**20 + 160  # vLLM's cache, and no copy of ours
