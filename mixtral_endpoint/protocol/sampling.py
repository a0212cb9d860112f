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
    constraint: Constraint | None = None  # response_format or tools: the grammar every token must keep to

    def __post_init__(self) -> None:
        # The engine's own invariants, checked again behind the schema.
        for f in fields(self):
            value = getattr(self, f.name)
            problem = None if value is None or f.name not in BY_NAME else BY_NAME[f.name].violation(value)
            if problem is not None:
                raise ValueError(f"{f.name} {problem}, got {value}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass(frozen=True)
class Generation:
    """What the engine returns for one prompt: new token ids and why it stopped."""

    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS, a stop string or the grammar's end) or "length"
