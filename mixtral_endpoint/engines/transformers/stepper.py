"""MixtralForCausalLM behind accelerate, generating from token ids, one step at a time.

It knows nothing of HTTP, Azure, MLflow or text: a Row is a prompt's token ids with frozen
SamplingSettings, and a Batch is the rows in flight with their shared KV cache. Rows may join a
running batch (their cache is left-padded to the batch's length) and leave it as soon as they
finish, which is what lets one model copy serve many callers. `TransformersEngine` drives it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xgrammar
from transformers import DynamicCache, MixtralForCausalLM

from mixtral_endpoint.engines.engine import Row
from mixtral_endpoint.engines.transformers.prepack import prepack
from mixtral_endpoint.engines.transformers.sampler import choose_tokens, new_generator, token_logprob
from mixtral_endpoint.model.checkpoint import Checkpoint
from mixtral_endpoint.model.placement import Plan
from mixtral_endpoint.protocol.errors import DoesNotFit, InternalError
from mixtral_endpoint.protocol.sampling import Generation, SamplingSettings, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Batch:
    rows: list[Row]
    generators: list[torch.Generator | None]  # each sampled row draws from its own
    cache: DynamicCache
    mask: torch.Tensor  # [batch, cached length]: 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # [batch]: position id of each row's next token
    last: torch.Tensor  # [batch]: each row's latest token, the next step's input


class Stepper:
    def __init__(self, model: MixtralForCausalLM, *, eos_id: int, context_window: int) -> None:
        self.model = model.eval()
        self.eos_id = eos_id
        self.context_window = context_window
        self.device = model.get_input_embeddings().weight.device

    @classmethod
    def load(cls, checkpoint: Checkpoint, plan: Plan, *, offload_folder: str | None = None) -> Stepper:
        """Loads the weights as `plan` places them, or refuses, before reading any, if they do not fit."""
        if not plan.fits:
            raise DoesNotFit(f"{checkpoint.path}: {plan.verdict}")
        log.info("loading %s: %s", checkpoint.path, plan.verdict)
        model = MixtralForCausalLM.from_pretrained(
            checkpoint.path,
            dtype=getattr(torch, plan.dtype),
            device_map=plan.device_map,
            offload_folder=offload_folder,
            use_safetensors=True,
            trust_remote_code=False,
        )
        if swapped := prepack(model):
            log.info("%d linears and experts blocks prepacked (fp32 on CPU)", swapped)
        return cls(model, eos_id=int(checkpoint.config["eos_token_id"]),
                   context_window=checkpoint.context_window)

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Generation]:
        """Generates for prompts that share settings, as one batch; one Generation per prompt, in order."""
        rows = [Row(list(p), settings) for p in prompts]
        batch = self.prefill(rows)
        while batch is not None:
            batch = self.step(batch)
        return [row.generation for row in rows]

    def probe(self) -> None:
        """One pass over a one-token prompt: raises if the model cannot run at all."""
        self.prefill([Row([self.eos_id], SamplingSettings(max_new_tokens=1))])

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row]) -> Batch | None:
        """Runs the prompts of new rows and picks their first tokens; returns the rows still going."""
        for row in rows:
            assert row.prompt, "every prompt needs at least one token"
            assert len(row.prompt) + row.settings.max_new_tokens <= self.context_window, "over the context window"
            assert (row.settings.constraint is None) == (row.grammar is None), "a constraint needs its grammar"
            row.matcher = xgrammar.GrammarMatcher(row.grammar) if row.grammar is not None else None
            row.started_at = time.monotonic()
        generators = [new_generator(row.settings, self.device, random.getrandbits(63)) for row in rows]
        width = max(len(row.prompt) for row in rows)
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width]
        cache = DynamicCache(config=self.model.config)
        # Every position's logits only where a row asks for its prompt's log-probabilities.
        every = any(row.settings.prompt_logprobs is not None for row in rows)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=0 if every else 1).logits  # [batch, width or 1, vocab]
        if every:
            for i, row in enumerate(rows):
                if row.settings.prompt_logprobs is not None:
                    row.prompt_logprobs = _prompt_logprobs(logits[i, width - len(row.prompt):], row)
        batch = Batch(list(rows), generators, cache, mask, positions[:, -1] + 1, ids[:, -1])
        return self._advance(batch, logits[:, -1, :])

    @torch.inference_mode()
    def step(self, batch: Batch) -> Batch | None:
        """One new token for every row of the batch; returns the rows still going."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        logits = self.model(input_ids=batch.last[:, None], attention_mask=batch.mask,
                            position_ids=batch.positions[:, None], past_key_values=batch.cache,
                            use_cache=True).logits[:, -1, :]
        batch.positions = batch.positions + 1
        return self._advance(batch, logits)

    def join(self, batch: Batch | None, new: Batch | None) -> Batch | None:
        """One batch of both: the shorter cache is left-padded (masked out) to the longer one's length."""
        if batch is None or new is None:
            return batch or new
        length = max(batch.mask.shape[1], new.mask.shape[1])
        a, b = _left_pad(batch, length), _left_pad(new, length)
        for layer_a, layer_b in zip(a.cache.layers, b.cache.layers, strict=True):
            layer_a.keys = torch.cat([layer_a.keys, layer_b.keys.to(layer_a.keys.device)])
            layer_a.values = torch.cat([layer_a.values, layer_b.values.to(layer_a.values.device)])
        return Batch(a.rows + b.rows, a.generators + b.generators, a.cache, torch.cat([a.mask, b.mask]),
                     torch.cat([a.positions, b.positions]), torch.cat([a.last, b.last]))

    def _advance(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        rows = batch.rows
        chosen, logprobs = choose_tokens(logits, [r.settings for r in rows], [r.prompt for r in rows],
                                         [r.tokens for r in rows], batch.generators, [r.matcher for r in rows],
                                         eos_id=self.eos_id)
        now = time.monotonic()
        keep = []
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            if row.matcher is not None and not row.matcher.accept_token(token):  # before the caller sees it
                row.fail(InternalError(f"the grammar refused token {token}, which its own mask allowed"))
                continue
            row.emit(token, now, len(rows), logprobs[i])
            reason = self._finish_reason(row, token, now)
            if reason is None:
                keep.append(i)
            else:
                row.finish(reason)
        if not keep:
            return None
        batch.last = torch.tensor(chosen, device=batch.last.device)
        return batch if len(keep) == len(rows) else _select(batch, keep)

    def _finish_reason(self, row: Row, token: int, now: float) -> str | None:
        grammar_ended = row.matcher is not None and row.matcher.is_terminated()  # it accepted EOS
        eos = token == self.eos_id and not row.settings.ignore_eos
        if grammar_ended or eos or token in row.settings.stop_token_ids:
            return "stop"
        if len(row.tokens) >= row.settings.max_new_tokens:
            return "length"
        if row.expired(now):
            return "time_limit"
        if row.cancelled:
            return "cancelled"
        return None


def _select(batch: Batch, keep: list[int]) -> Batch:
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    # Columns that are padding for every remaining row carry nothing: drop them from mask and cache.
    start = int((mask.sum(dim=0) > 0).nonzero()[0])
    for layer in batch.cache.layers:
        layer_index = index.to(layer.keys.device)
        layer.keys = layer.keys[layer_index, :, start:]
        layer.values = layer.values[layer_index, :, start:]
    return Batch([batch.rows[i] for i in keep], [batch.generators[i] for i in keep], batch.cache, mask[:, start:],
                 batch.positions[index], batch.last[index])


def _left_pad(batch: Batch, length: int) -> Batch:
    extra = length - batch.mask.shape[1]
    if extra == 0:
        return batch
    for layer in batch.cache.layers:
        # keys/values: [batch, kv_heads, cached length, head_dim]; pad the length on the left.
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))
    mask = torch.nn.functional.pad(batch.mask, (extra, 0))
    return Batch(batch.rows, batch.generators, batch.cache, mask, batch.positions, batch.last)


def _prompt_logprobs(logits: torch.Tensor, row: Row) -> list[TokenLogprob | None]:
    """logits: [prompt, vocab], the row's own positions. Token j's log-probability is read at position j - 1;
    the first token has none."""
    logprobs = logits[:-1].float().log_softmax(dim=-1)  # [prompt - 1, vocab]
    top = row.settings.prompt_logprobs
    return [None, *(token_logprob(logprobs[j], token, top) for j, token in enumerate(row.prompt[1:]))]
