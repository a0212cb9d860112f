"""Prompt encoding with mistral-common, so prompts are token-for-token what Mixtral was trained on.

Mixtral uses Mistral's tokenizer v1 (SentencePiece): `[INST]`/`[/INST]` turns, a leading system
message folded into the first user turn, and user text such as `</s>` or `[INST]` encoded as
plain text, never as control tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.protocol.request import Message

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_MESSAGE_TYPES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def reference_tokenizer_file() -> Path:
    """Mixtral's tokenizer.model (v1), as shipped inside mistral-common."""
    return Path(MistralTokenizer._data_path()) / "tokenizer.model.v1"


class PromptTokenizer:
    def __init__(self, path: Path) -> None:
        self._mistral = MistralTokenizer.from_file(str(path))
        self._sp = self._mistral.instruct_tokenizer.tokenizer
        self.bos_id: int = self._sp.bos_id
        self.eos_id: int = self._sp.eos_id
        self.vocab_size: int = self._sp.n_words

    def encode_chat(self, conversation: Sequence[Message], *, param: str | None = None) -> list[int]:
        """The conversation's ids; a conversation mistral-common refuses is an InvalidRequest naming `param`."""
        messages = [_MESSAGE_TYPES[m.role](content=m.content) for m in conversation]
        try:
            return self._mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        except MistralCommonException as exc:
            raise InvalidRequest(f"the conversation was refused by the tokenizer: {exc}", param=param) from None

    def encode_text(self, text: str, *, bos: bool = True) -> list[int]:
        return self._sp.encode(text, bos=bos, eos=False)

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text: its piece with SentencePiece's `▁` as a space; a byte-fallback
        piece (`<0x0A>`) its one byte; a control token (`<s>`, `</s>`) nothing."""
        piece = self._sp.id_to_piece(token_id)
        if _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        if self._sp.is_special(token_id):
            return b""
        return piece.replace("\u2581", " ").encode()

    def pieces(self) -> list[str]:
        """Every token's SentencePiece piece, by id (byte-fallback pieces as `<0xNN>`): what xgrammar reads."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._sp.decode([t for t in token_ids if t != self.eos_id])
