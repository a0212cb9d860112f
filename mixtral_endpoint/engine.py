"""The engine: MixtralForCausalLM behind accelerate, generating from token ids.

It knows nothing of HTTP, Azure, MLflow or text: prompts are token id lists, settings are a
frozen SamplingSettings, and results are token ids with a finish reason. Stop strings reach it
only as an opaque per-row check.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, MixtralForCausalLM, StoppingCriteria, StoppingCriteriaList

from .checkpoint import Checkpoint
from .placement import Placement, check_fits
from .sampling import Generation, SamplingSettings

log = logging.getLogger(__name__)

StopCheck = Callable[[Sequence[int]], bool]  # new token ids of one row -> stop now?


class Engine:
    def __init__(self, model: MixtralForCausalLM, *, eos_id: int, context_window: int) -> None:
        self.model = model.eval()
        self.eos_id = eos_id
        self.context_window = context_window
        self.device = next(model.parameters()).device
        # One generation at a time: the seed is process-global and the model is shared.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, checkpoint: Checkpoint, placement: Placement) -> Engine:
        check_fits(checkpoint, placement)
        model = MixtralForCausalLM.from_pretrained(
            checkpoint.path,
            dtype=getattr(torch, placement.dtype),
            device_map=placement.device_map,
            max_memory=placement.max_memory,
            offload_folder=placement.offload_folder,
            use_safetensors=True,
            trust_remote_code=False,
        )
        log.info("loaded %s (%d parameters, %s, device map %s)", checkpoint.path, checkpoint.parameters,
                 placement.dtype, getattr(model, "hf_device_map", "cpu"))
        return cls(model, eos_id=int(checkpoint.config["eos_token_id"]),
                   context_window=checkpoint.context_window)

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, *, stop_check: StopCheck | None = None
    ) -> list[Generation]:
        """Generates for a batch of prompts that share settings; one Generation per prompt, in order."""
        assert prompts and all(prompts), "every prompt needs at least one token"
        longest = max(len(p) for p in prompts)
        assert longest + settings.max_new_tokens <= self.context_window, "prompt + max_new_tokens over context"
        input_ids, attention_mask = self._left_pad(prompts, longest)
        stopper = _StopStrings(stop_check, longest) if stop_check else None
        with self._lock, torch.inference_mode():
            if not settings.greedy:
                torch.manual_seed(settings.seed if settings.seed is not None else random.getrandbits(63))
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(settings),
                stopping_criteria=StoppingCriteriaList([stopper]) if stopper else None,
            )
        rows = output[:, longest:].tolist()
        return [self._finish(i, row, settings, stopper) for i, row in enumerate(rows)]

    def _left_pad(self, prompts: Sequence[Sequence[int]], longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [batch, longest]: left padding keeps every prompt's last token in the last column.
        ids = torch.full((len(prompts), longest), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, longest - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        sampling = {} if settings.greedy else {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=not settings.greedy,
            repetition_penalty=settings.repetition_penalty,
            # ignore_eos: an empty list, not None, which would fall back to the model's EOS.
            eos_token_id=[] if settings.ignore_eos else self.eos_id,
            pad_token_id=self.eos_id,
            **sampling,
        )

    def _finish(self, index: int, row: list[int], settings: SamplingSettings,
                stopper: _StopStrings | None) -> Generation:
        stopped_at = stopper.stopped_at.get(index) if stopper else None
        if stopped_at is not None:
            row = row[:stopped_at]
        if not settings.ignore_eos and self.eos_id in row:
            return Generation(tuple(row[: row.index(self.eos_id) + 1]), "stop")
        if stopped_at is not None:
            return Generation(tuple(row), "stop")
        return Generation(tuple(row), "length")


class _StopStrings(StoppingCriteria):
    """Ends each row whose new tokens pass `check`, and remembers after how many tokens."""

    def __init__(self, check: StopCheck, prompt_width: int) -> None:
        self.check = check
        self.prompt_width = prompt_width
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        new = input_ids[:, self.prompt_width:]  # [batch, generated so far]
        done = torch.zeros(new.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(new.tolist()):
            if i in self.stopped_at or self.check(row):
                self.stopped_at.setdefault(i, len(row))
                done[i] = True
        return done
