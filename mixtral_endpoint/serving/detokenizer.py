"""One row's text as its tokens arrive: incremental decoding and stop strings, in the core.

Decoding is incremental (as TGI and vLLM do it): each new token is decoded with the few tokens
before it, never the whole text again. SentencePiece drops the leading space of the first piece it
decodes, so both decodes start at the same token and only their difference is new text. A piece
ending in U+FFFD is a character whose bytes have not all arrived: it waits for the next token.

With `marks` (a stream asking for log-probabilities) text is taken only at the end of a token's text, and
`released` counts the tokens whose text has all been taken, so each piece goes out with exactly its tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class Detokenizer:
    def __init__(self, decode: Decode, *, eos_id: int, stops: Sequence[str] = (),
                 context: Sequence[int] = (), marks: bool = False) -> None:
        """`context`: token ids decoded before the first new one (a text prompt's last tokens, so
        the completion keeps its leading space); none for a chat reply."""
        self._decode = decode
        self._eos_id = eos_id
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._ids = list(context)
        self._prefix = 0  # self._ids[_prefix:_read] were decoded last time, as the start of the window
        self._read = len(self._ids)
        self.tokens: list[int] = []  # every token id taken, EOS included
        self.text = ""
        self.stopped = False  # a stop string appeared; `text` ends before it
        self._sent = 0
        # With marks: (len(text), len(tokens)) after each decode that added text; those past what was taken.
        self._marks: deque[tuple[int, int]] | None = deque() if marks else None
        self.released = 0  # with marks: tokens whose text has all been taken (at the end, every token)

    def add(self, token: int) -> None:
        assert not self.stopped, "no tokens after a stop string"
        self.tokens.append(token)
        if token != self._eos_id:
            self._ids.append(token)
            self._decode_new(final=False)

    def extend(self, tokens: Sequence[int]) -> None:
        """A row's tokens all at once, where no stop string is watched for: decoded once, at `flush`
        (per token, 256 rows of 128 tokens cost 0.2 s of the GIL at the step they all end)."""
        assert not self._stops, "stop strings are watched for token by token"
        self.tokens.extend(tokens)
        self._ids.extend(t for t in tokens if t != self._eos_id)

    def flush(self) -> None:
        """The row has ended: decode what was waiting for more bytes."""
        if not self.stopped:
            self._decode_new(final=True)

    def take(self, *, final: bool = False) -> str:
        """New text that is safe to send: never a stop string, nor text that could start one."""
        hold = 0 if final or self.stopped else max(self._longest - 1, 0)
        end = max(len(self.text) - hold, self._sent)
        if self._marks is not None:
            if final or self.stopped:
                self.released = len(self.tokens)
            else:
                end, marks = self._sent, self._marks
                while marks and marks[0][0] <= len(self.text) - hold:
                    end, self.released = marks.popleft()
        piece, self._sent = self.text[self._sent:end], end
        return piece

    def _decode_new(self, *, final: bool) -> None:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return
        self._prefix, self._read = self._read, len(self._ids)
        start = max(len(self.text) - self._longest + 1, 0)  # a stop string may straddle the old end
        self.text += after[len(before):]
        if self._marks is not None:
            self._marks.append((len(self.text), len(self.tokens)))
        cut = _find_stop(self.text, self._stops, start)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True


def _find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Where the earliest stop string starts in `text[start:]`, or -1."""
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
