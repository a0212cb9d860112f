"""The settings one generation runs with: the contract between the protocol and the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields

from mixtral_endpoint.protocol.constraints import Constraint
from mixtral_endpoint.protocol.parameters import BY_NAME, default


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    # Defaults and bounds are the request parameters' own (parameters.py).
    max_new_tokens: int
    do_sample: bool = default("do_sample")
    temperature: float = default("temperature")
    top_p: float = default("top_p")
    top_k: int = default("top_k")
    repetition_penalty: float = default("repetition_penalty")
    seed: int | None = default("seed")
    ignore_eos: bool = default("ignore_eos")
    presence_penalty: float = default("presence_penalty")
    frequency_penalty: float = default("frequency_penalty")
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    min_p: float = default("min_p")
    min_tokens: int = default("min_tokens")
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = default("logprobs")  # alternatives per new token; None: no log-probabilities
    prompt_logprobs: int | None = default("prompt_logprobs")
    constraint: Constraint | None = None  # response_format or tools: the grammar every token must keep to

    def __post_init__(self) -> None:
        # The engine's own invariants, checked again behind the schema.
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            problem = BY_NAME[f.name].violation(value) if numeric and f.name in BY_NAME else None
            if problem is not None:
                raise ValueError(f"{f.name} {problem}, got {value}")
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} is above max_new_tokens {self.max_new_tokens}")

    @property
    def penalised(self) -> bool:
        """Whether the tokens a row has seen change its next scores."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens at its place, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)


@dataclass(frozen=True)
class Generation:
    """What the engine returns for one prompt: new token ids and why it stopped."""

    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS, a stop string or the grammar's end) or "length"
