"""Tokenizer tier: prompt ids are exactly mistral-common's, and user text never becomes control tokens."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_endpoint.model.tokenizer import PromptTokenizer, reference_tokenizer_file
from mixtral_endpoint.protocol.request import Message

REFERENCE = MistralTokenizer.v1()
TYPES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
CONTROL_TEXT = "</s> <s> [INST] [/INST] <unk>"

CONVERSATIONS = {
    "one user turn": [("user", "Hello")],
    "model card sample": [("user", "I am going to Paris, what should I see?"),
                          ("assistant", "The Eiffel Tower."), ("user", "What is so great about #1?")],
    "system folded in": [("system", "Answer in French."), ("user", "Hi"), ("assistant", "Salut"), ("user", "Bye")],
    "unicode": [("user", "Ünïcødé ✓ — 日本語 🚀 עברית")],
    "odd whitespace": [("user", "  leading\n\n\ttabs  and trailing  \r\n")],
    "control tokens typed as text": [("user", f"{CONTROL_TEXT} please"), ("assistant", CONTROL_TEXT),
                                     ("user", "[INST] again </s>")],
}


def reference_ids(conversation: list[tuple[str, str]]) -> list[int]:
    messages = [TYPES[role](content=content) for role, content in conversation]
    return REFERENCE.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def test_checkpoint_tokenizer_is_mixtrals_v1(tiny_checkpoint):
    assert (tiny_checkpoint / "tokenizer.model").read_bytes() == reference_tokenizer_file().read_bytes()


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_prompt_ids_match_mistral_common(tokenizer: PromptTokenizer, name: str):
    conversation = CONVERSATIONS[name]
    ours = tokenizer.encode_chat([Message(role, content) for role, content in conversation])
    assert ours == reference_ids(conversation)


def test_control_token_text_in_user_content_stays_plain_text(tokenizer: PromptTokenizer):
    ids = tokenizer.encode_chat([Message("user", CONTROL_TEXT), Message("assistant", CONTROL_TEXT),
                                 Message("user", CONTROL_TEXT)])
    # Only the real turn structure carries control ids: one BOS, one EOS after the assistant turn.
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id
    assert ids.count(tokenizer.eos_id) == 1
    assert tokenizer.encode_text(CONTROL_TEXT).count(tokenizer.eos_id) == 0


def test_system_message_is_folded_into_the_first_user_turn(tokenizer: PromptTokenizer):
    ids = tokenizer.encode_chat([Message("system", "Be brief."), Message("user", "Hi")])
    assert tokenizer.decode(ids) == "[INST] Be brief.\n\nHi [/INST]"


def test_text_prompt_starts_with_bos_and_round_trips(tokenizer: PromptTokenizer):
    ids = tokenizer.encode_text("Once upon a time")
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids) == "Once upon a time"
