"""Choosing each row's next token with that row's own settings, inside one batched step.

The order and semantics follow transformers' generate: repetition penalty, then the grammar's mask
(a constrained row's disallowed tokens get -inf), then temperature, top-k and top-p, then sampling.
Each sampled row draws from its own torch.Generator, so a seeded request gives the same tokens alone
or in a crowd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar

from mixtral_endpoint.engines.grammar import mask
from mixtral_endpoint.protocol.sampling import SamplingSettings


def new_generator(settings: SamplingSettings, device: torch.device, fallback_seed: int) -> torch.Generator | None:
    if settings.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else fallback_seed)
    return generator


def choose_tokens(
    logits: torch.Tensor,
    settings: Sequence[SamplingSettings],
    seen: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    matchers: Sequence[xgrammar.GrammarMatcher | None] = (),
) -> list[int]:
    """logits: [batch, vocab] for the last position; seen: prompt + generated ids of each row;
    matchers: each constrained row's grammar matcher (None for a free row, or none at all)."""
    logits = logits.float()
    for i, s in enumerate(settings):
        if s.repetition_penalty != 1.0:
            ids = torch.tensor(list(seen[i]), device=logits.device)
            scores = logits[i, ids]
            logits[i, ids] = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
    logits = torch.nan_to_num(logits)  # a tiny penalty can overflow float32: keep scores finite
    if any(m is not None for m in matchers):
        mask(logits, matchers)
    chosen = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(settings):
        if not s.greedy:
            chosen[i] = _sample(logits[i], s, generators[i])
    return chosen


def _sample(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None) -> int:
    # Shifted so the top score is 0, and a temperature float32 can hold: a tiny one then gives -inf
    # for the others, never 0/0 or inf - inf = NaN.
    scores = (logits - logits.max()) / max(s.temperature, 1e-30)  # [vocab]
    if s.top_k:
        kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores)  # ascending, as transformers' TopPLogitsWarper
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - s.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
