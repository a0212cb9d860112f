"""The core's incremental detokenizer and stop strings, with the real v1 tokenizer."""

from __future__ import annotations

import pytest

from mixtral_endpoint.model.tokenizer import PromptTokenizer
from mixtral_endpoint.serving.detokenizer import Detokenizer

TEXTS = ["Hello world, how are you?", "Ünïcødé ✓ 日本語 🙂 bytes", "  leading spaces\nand\ttabs  ", "a</s>b [INST] c"]


def feed(detokenizer: Detokenizer, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        detokenizer.add(token)
        pieces.append(detokenizer.take())
        if detokenizer.stopped:
            return pieces
    detokenizer.flush()
    pieces.append(detokenizer.take(final=True))
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decode(tokenizer: PromptTokenizer, text: str):
    ids = tokenizer.encode_text(text)[1:]
    detokenizer = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id)
    assert "".join(feed(detokenizer, ids)) == tokenizer.decode(ids) == detokenizer.text


@pytest.mark.parametrize("text", TEXTS)
def test_all_tokens_at_once_decode_as_token_by_token(tokenizer: PromptTokenizer, text: str):
    prompt = tokenizer.encode_text("Once upon a time")
    ids = [*tokenizer.encode_text(text)[1:], tokenizer.eos_id]
    one_by_one = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id, context=prompt[-8:])
    feed(one_by_one, ids)
    at_once = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id, context=prompt[-8:])
    at_once.extend(ids)
    at_once.flush()
    assert at_once.text == one_by_one.text and at_once.tokens == one_by_one.tokens == ids
    assert at_once.take(final=True) == at_once.text


def test_a_completion_keeps_its_leading_space_after_the_prompt(tokenizer: PromptTokenizer):
    prompt = tokenizer.encode_text("The capital of France")
    whole = tokenizer.encode_text("The capital of France is Paris")
    assert whole[: len(prompt)] == prompt
    detokenizer = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id, context=prompt[-8:])
    assert "".join(feed(detokenizer, whole[len(prompt):])) == " is Paris"


def test_a_character_split_over_byte_tokens_is_never_sent_in_halves(tokenizer: PromptTokenizer):
    ids = tokenizer.encode_text("🙂")[1:]
    assert len(ids) > 1  # byte-fallback pieces
    pieces = feed(Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id), ids)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces).strip() == "🙂"


def test_eos_adds_no_text_but_counts_as_a_token(tokenizer: PromptTokenizer):
    ids = [*tokenizer.encode_text("Hi there")[1:], tokenizer.eos_id]
    detokenizer = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id)
    assert "".join(feed(detokenizer, ids)) == "Hi there" and detokenizer.tokens == ids


@pytest.mark.parametrize(("stops", "expected"), [
    (["world"], "Hello "),
    ([","], "Hello world"),
    (["o w", "ld"], "Hell"),  # the earliest stop wins, though another one ends first
    (["absent"], "Hello world, how are you?"),
    (["you?"], "Hello world, how are "),
])
def test_stop_strings_cut_the_text_and_are_never_sent(tokenizer: PromptTokenizer, stops: list[str], expected: str):
    ids = tokenizer.encode_text("Hello world, how are you?")[1:]
    detokenizer = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id, stops=stops)
    pieces = feed(detokenizer, ids)
    assert detokenizer.text == expected == "".join(pieces)
    assert detokenizer.stopped == (expected != "Hello world, how are you?")
    assert not any(s in p for s in stops for p in pieces)


def test_tokens_stop_at_the_one_that_completed_the_stop_string(tokenizer: PromptTokenizer):
    ids = tokenizer.encode_text("one two three four")[1:]
    detokenizer = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id, stops=["three"])
    feed(detokenizer, ids)
    assert detokenizer.tokens == ids[: len(detokenizer.tokens)] and len(detokenizer.tokens) < len(ids)
    assert tokenizer.decode(detokenizer.tokens).endswith("three")


@pytest.mark.parametrize("stops", [(), ("you?", "🙂 b")])
@pytest.mark.parametrize("text", TEXTS)
def test_with_marks_each_piece_is_exactly_its_tokens_text(tokenizer: PromptTokenizer, text: str, stops: tuple):
    """A stream asking for log-probabilities: a piece ends where a token's text ends (a character's first bytes
    wait for its last), and `released` counts the tokens it completes; the end releases every token, EOS and a
    stop string's included."""
    prompt = tokenizer.encode_text("Once upon a time")
    ids = [*tokenizer.encode_text(text)[1:], tokenizer.eos_id]
    detokenizer = Detokenizer(tokenizer.decode, eos_id=tokenizer.eos_id, stops=stops, context=prompt[-8:],
                              marks=True)
    released, text_so_far = 0, ""
    for token in ids:
        detokenizer.add(token)
        piece = detokenizer.take(final=detokenizer.stopped)
        if not detokenizer.stopped:
            assert text_so_far + piece == tokenizer.decode([*prompt[-8:], *ids[:detokenizer.released]])[
                len(tokenizer.decode(prompt[-8:])):], token
        assert detokenizer.released >= released
        released, text_so_far = detokenizer.released, text_so_far + piece
        if detokenizer.stopped:
            break
    else:
        detokenizer.flush()
        text_so_far += detokenizer.take(final=True)
    assert detokenizer.released == len(detokenizer.tokens) and text_so_far == detokenizer.text
