"""Choosing each row's next token with that row's own settings, inside one batched step.

The order follows vLLM's sampler, so both engines mean the same by each setting: log-probabilities are read
off the model's own distribution first (vLLM's default "raw_logprobs"), then a token's logit bias, then
min_tokens (end-of-sequence and the stop token ids barred), then the penalties (repetition over the prompt
and the answer, transformers' definition; presence and frequency over the answer, OpenAI's), then the
grammar's mask (a constrained row's disallowed tokens get -inf), then temperature, min-p, top-k and top-p,
then sampling. Each sampled row draws from its own torch.Generator, so a seeded request gives the same
tokens alone or in a crowd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar

from mixtral_endpoint.engines.grammar import mask
from mixtral_endpoint.protocol.sampling import SamplingSettings, TokenLogprob


def new_generator(settings: SamplingSettings, device: torch.device, fallback_seed: int) -> torch.Generator | None:
    if settings.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else fallback_seed)
    return generator


def choose_tokens(
    logits: torch.Tensor,
    settings: Sequence[SamplingSettings],
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    matchers: Sequence[xgrammar.GrammarMatcher | None] = (),
    *,
    eos_id: int,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [batch, vocab] for the last position; prompts and answers: each row's ids so far; matchers: each
    constrained row's grammar matcher (None for a free row, or none at all). Returns each row's token, and its
    log-probability where the row asks for them."""
    logits = logits.float()
    asking = [i for i, s in enumerate(settings) if s.logprobs is not None]
    raw = logits[asking].log_softmax(dim=-1) if asking else None  # [asking, vocab]
    for i, s in enumerate(settings):
        if s.logit_bias:
            ids, bias = zip(*s.logit_bias, strict=True)
            logits[i, list(ids)] += torch.tensor(bias, device=logits.device)
        if len(answers[i]) < s.min_tokens:
            barred = [*s.stop_token_ids, *(() if s.ignore_eos else (eos_id,))]
            logits[i, barred] = float("-inf")
        if s.penalised:
            _penalise(logits[i], s, prompts[i], answers[i])
    logits = torch.nan_to_num(logits)  # a tiny penalty can overflow float32: keep scores finite
    if any(m is not None for m in matchers):
        mask(logits, matchers)
    chosen = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(settings):
        if not s.greedy:
            chosen[i] = _sample(logits[i], s, generators[i])
    logprobs: list[TokenLogprob | None] = [None] * len(settings)
    for k, i in enumerate(asking):
        logprobs[i] = token_logprob(raw[k], chosen[i], settings[i].logprobs)
    return chosen, logprobs


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """logprobs: [vocab] log-probabilities at one place; `token`'s, and the `top` most likely."""
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(float(logprobs[token]), () if best is None else tuple(
        zip(best.indices.tolist(), best.values.tolist(), strict=True)))


def _penalise(scores: torch.Tensor, s: SamplingSettings, prompt: Sequence[int], answer: Sequence[int]) -> None:
    """scores: [vocab], in place."""
    if s.repetition_penalty != 1.0:
        ids = torch.tensor([*prompt, *answer], device=scores.device)
        seen = scores[ids]
        scores[ids] = torch.where(seen < 0, seen * s.repetition_penalty, seen / s.repetition_penalty)
    if answer and (s.presence_penalty or s.frequency_penalty):
        ids, counts = torch.tensor(list(answer), device=scores.device).unique(return_counts=True)
        scores[ids] -= s.frequency_penalty * counts.to(scores.dtype) + s.presence_penalty


def _sample(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None) -> int:
    # Shifted so the top score is 0, and a temperature float32 can hold: a tiny one then gives -inf
    # for the others, never 0/0 or inf - inf = NaN.
    scores = (logits - logits.max()) / max(s.temperature, 1e-30)  # [vocab]
    if s.min_p:  # the top score is 0: a token's probability over the top one's is exp(score)
        scores = scores.masked_fill(scores < torch.log(torch.tensor(s.min_p)), float("-inf"))
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
