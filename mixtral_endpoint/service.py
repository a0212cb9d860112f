"""The one core every door calls: a request payload in, a response body out, or a typed error."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import inspect_checkpoint
from .config import ServerConfig
from .engine import Engine, StopCheck
from .errors import ContextLengthExceeded, InternalError, PayloadTooLarge
from .placement import plan_placement
from .protocol import Completion, ScoringRequest, parse_json, parse_request, render
from .sampling import Generation
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


class Scorer:
    def __init__(self, engine: Engine, tokenizer: PromptTokenizer, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        window = engine.context_window
        self.max_total_tokens = min(config.max_total_tokens, window) if config.max_total_tokens else window

    @classmethod
    def load(cls, checkpoint_dir: Path, config: ServerConfig) -> Scorer:
        checkpoint = inspect_checkpoint(checkpoint_dir)
        engine = Engine.load(checkpoint, plan_placement(config))
        return cls(engine, PromptTokenizer(checkpoint_dir / "tokenizer.model"), config)

    def score_body(self, body: bytes, *, request_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Scores a raw HTTP body: size cap first, then JSON, then the request."""
        if len(body) > self.config.max_body_bytes:
            raise PayloadTooLarge(
                f"the request body is {len(body)} bytes; at most {self.config.max_body_bytes} are allowed")
        return self.score(parse_json(body), request_id=request_id)

    def score(self, payload: Any, *, request_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        request = parse_request(payload, self.config.limits)
        request_id = request_id or uuid.uuid4().hex
        started = time.perf_counter()
        prompts = self._encode(request)
        try:
            generations = self.engine.generate(prompts, request.settings, stop_check=self._stop_check(request))
        except Exception as exc:
            log.exception("generation failed for request %s", request_id)
            raise InternalError("generation failed; the server log has the details") from exc
        completions = [self._complete(request, p, g) for p, g in zip(prompts, generations, strict=True)]
        self._log(request_id, request, completions, time.perf_counter() - started)
        return render(request, completions)

    def _encode(self, request: ScoringRequest) -> list[list[int]]:
        if request.conversation is not None:
            prompts = [self.tokenizer.encode_chat(request.conversation)]
        else:
            assert request.prompts is not None
            prompts = [self.tokenizer.encode_text(p) for p in request.prompts]
        wanted = request.settings.max_new_tokens
        for i, ids in enumerate(prompts):
            if len(ids) + wanted > self.max_total_tokens:
                raise ContextLengthExceeded(
                    f"the prompt is {len(ids)} tokens and max_new_tokens is {wanted}: {len(ids) + wanted} "
                    f"tokens, over the context window of {self.max_total_tokens}",
                    param="input_data.input_string" + ("" if request.is_chat else f"[{i}]"),
                )
        return prompts

    def _stop_check(self, request: ScoringRequest) -> StopCheck | None:
        stops = request.settings.stop
        if not stops:
            return None
        # A stop string of n characters spans at most 4n tokens (byte-fallback pieces are 1/4 char).
        window = 4 * max(len(s) for s in stops) + 4
        decode = self.tokenizer.decode
        return lambda ids: any(s in decode(ids[-window:]) for s in stops)

    def _complete(self, request: ScoringRequest, prompt: Sequence[int], generation: Generation) -> Completion:
        ids = generation.token_ids
        text = (self.tokenizer.decode(ids) if request.is_chat
                else self.tokenizer.decode_continuation(prompt, ids))
        finish_reason = generation.finish_reason
        cut = min((i for i in (text.find(s) for s in request.settings.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish_reason = text[:cut], "stop"
        return Completion(text=text, prompt_token_ids=tuple(prompt), token_ids=ids, finish_reason=finish_reason)

    def _log(self, request_id: str, request: ScoringRequest, completions: list[Completion], seconds: float) -> None:
        prompt_tokens = sum(len(c.prompt_token_ids) for c in completions)
        new_tokens = sum(len(c.token_ids) for c in completions)
        extra = ""
        if self.config.log_prompts:
            extra = f" prompt={request.conversation or request.prompts!r}"
        log.info("request=%s prompts=%d prompt_tokens=%d completion_tokens=%d seconds=%.3f tokens_per_s=%.1f%s",
                 request_id, len(completions), prompt_tokens, new_tokens, seconds,
                 new_tokens / seconds if seconds > 0 else 0.0, extra)
