"""Grammar-constrained decoding with xgrammar, against the v1 SentencePiece vocabulary.

A Constraint (protocol/constraints.py) becomes one xgrammar Grammar, the same for both engines: our engine
compiles it here (kept within a budget of bytes) and gives each row its own matcher, whose bitmask of
allowed tokens the sampler applies and which says when the grammar has ended; vLLM gets the same grammar
as EBNF text and compiles (and keeps) it with its own xgrammar.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

import numpy as np
import torch
import xgrammar

from mixtral_endpoint.model.tokenizer import PromptTokenizer
from mixtral_endpoint.protocol.constraints import Constraint

# tool_choice "auto": text that opens like neither a JSON array or object nor a blank, so the two
# branches of the grammar part at the first character.
_TEXT_REGEX = r"[^\[{\s][\s\S]*"
# What the compiled grammars this process keeps may take, together: one takes from tens of KB to tens of MB
# (`[a-z]{1,500}`: 1.4 MB). vLLM's own cache gets the same (vllm_engine.py).
GRAMMAR_CACHE_BYTES: Final = 256 * 2**20


def grammar(constraint: Constraint) -> xgrammar.Grammar:
    """The constraint's grammar; raises ValueError with the compiler's first line when it refuses it."""
    try:
        if constraint.kind == "json_schema":
            # No free whitespace: a model with little sense of JSON could emit blanks until max_new_tokens.
            # Strict (xgrammar's default): no properties beyond those the schema names.
            built = xgrammar.Grammar.from_json_schema(constraint.value, any_whitespace=False)
        elif constraint.kind == "regex":
            built = xgrammar.Grammar.from_regex(constraint.value)
        else:
            choices = json.loads(constraint.value)
            built = xgrammar.Grammar.from_ebnf("root ::= " + " | ".join(_literal(c) for c in choices))
        return xgrammar.Grammar.union(built, xgrammar.Grammar.from_regex(_TEXT_REGEX)) if constraint.or_text else built
    except (RuntimeError, ValueError) as exc:
        raise ValueError(str(exc).strip().splitlines()[0].split("] ", 1)[-1]) from None


def _literal(text: str) -> str:
    """An EBNF string literal that xgrammar reads as `text`, code point by code point. Not json.dumps: it
    writes a character past U+FFFF as two surrogate escapes, which xgrammar reads as two code points that no
    UTF-8 text holds."""
    return '"' + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}" for c in text) + '"'


def ebnf(constraint: Constraint) -> str:
    """The grammar as EBNF text, for vLLM's structured outputs; raises ValueError as grammar() does."""
    return str(grammar(constraint))


class Grammars:
    """Compiles constraints for one tokenizer, on the thread that asks.

    xgrammar's compiler keeps what it compiled, least recently used out past `budget_bytes` (without a limit
    it kept everything). Not a cache of our own beside it: xgrammar reuses what it kept for the parts a new
    grammar shares with them (regexes differing only in a prefix: 2 ms each instead of 42). A compilation lets
    go of the GIL and holds up no other constraint's; callers of one being compiled wait for that compilation.
    """

    def __init__(self, tokenizer: PromptTokenizer, *, budget_bytes: int = GRAMMAR_CACHE_BYTES) -> None:
        info = xgrammar.TokenizerInfo(tokenizer.pieces(), xgrammar.VocabType.BYTE_FALLBACK,
                                      vocab_size=tokenizer.vocab_size, stop_token_ids=[tokenizer.eos_id],
                                      add_prefix_space=True)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=budget_bytes)

    @property
    def budget_bytes(self) -> int:
        return self._compiler.cache_limit_bytes

    @property
    def bytes(self) -> int:
        """What the compiled grammars kept take."""
        return self._compiler.get_cache_size_bytes()

    def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        """The constraint's compiled grammar; raises ValueError naming what the compiler refused."""
        try:
            return self._compiler.compile_grammar(grammar(constraint))
        except RuntimeError as exc:
            raise ValueError(str(exc).strip().splitlines()[0]) from None


def mask(logits: torch.Tensor, matchers: Sequence[xgrammar.GrammarMatcher | None]) -> None:
    """Sets to -inf, in place, every score of logits [batch, vocab] that a row's grammar does not allow next."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab)  # [rows, ceil(vocab / 32)] int32, bit j: token j
    for k, i in enumerate(rows):
        matchers[i].fill_next_token_bitmask(bitmask, k)
    # Unpacked by numpy (little-endian words, so bit j of the row's bytes is token j): xgrammar's own CPU
    # apply_token_bitmask_inplace took 2 ms a step for 8 rows here, this a fraction of it.
    blocked = np.unpackbits(~bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    blocked = torch.from_numpy(blocked.view(np.bool_)).to(logits.device)  # [rows, vocab]
    if len(rows) == len(matchers):
        logits.masked_fill_(blocked, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(blocked, float("-inf"))
