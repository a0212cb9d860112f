"""Grammar-constrained decoding with xgrammar, against the v1 SentencePiece vocabulary (issue 17).

A Constraint (a JSON schema, any JSON object, a regex, or a choice among strings) compiles once per
tokenizer into a grammar (cached by the constraint); each row then gets its own matcher, which gives
the tokens allowed next as a bitmask over the vocabulary and says when the grammar has ended.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xgrammar

from .tokenizer import PromptTokenizer

Kind = Literal["json_schema", "json_object", "regex", "choice"]


@dataclass(frozen=True)
class Constraint:
    kind: Kind
    value: str = ""  # the schema as canonical JSON, the regex, or the choices as a JSON array

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: list[str]) -> Constraint:
        return cls("choice", json.dumps(choices))


class Grammars:
    """Compiles constraints for one tokenizer, each once."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        info = xgrammar.TokenizerInfo(tokenizer.pieces(), xgrammar.VocabType.BYTE_FALLBACK,
                                      vocab_size=tokenizer.vocab_size, stop_token_ids=[tokenizer.eos_id],
                                      add_prefix_space=True)
        self.vocab_size = tokenizer.vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self._compiled: dict[Constraint, xgrammar.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        """The constraint's grammar; raises ValueError naming what the compiler refused."""
        with self._lock:
            if constraint not in self._compiled:
                self._compiled[constraint] = self._compile(constraint)
            return self._compiled[constraint]

    def matcher(self, constraint: Constraint) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(self.compile(constraint))

    def allowed(self, matcher: xgrammar.GrammarMatcher) -> torch.Tensor:
        """The matcher's next-token bitmask, for `xgrammar.apply_token_bitmask_inplace`."""
        bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask

    def _compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        try:
            if constraint.kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if constraint.kind == "json_schema":
                # No free whitespace: a model with little sense of JSON could emit blanks until max_new_tokens.
                return self._compiler.compile_json_schema(constraint.value, any_whitespace=False)
            if constraint.kind == "regex":
                return self._compiler.compile_regex(constraint.value)
            choices = json.loads(constraint.value)
            return self._compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(str(exc).strip().splitlines()[0]) from None
