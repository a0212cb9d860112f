"""vLLM behind the engine interface: the GPU engine. Its CPU build runs the same code in the tests.

vLLM gets our token ids (a TokensPrompt), so prompts stay token-exact with mistral-common, and returns
token ids; it loads the checkpoint's tokenizer (mistral-common's, `tokenizer_mode="mistral"`) only
because its structured outputs build their vocabulary from it. Each row's own settings become its
SamplingParams, a constraint as the same xgrammar grammar our engine runs: its EBNF text, which the core
wrote on the request's thread (grammar.py) and the row carries. One thread owns vLLM's `LLMEngine`: it adds
newcomers, aborts rows that were cancelled or ran out of time, and steps, as our own engine's thread does.

With GPUs (MIXTRAL_ENGINE_PROCESS=auto) vLLM's engine core, its scheduler and the loop that drives the GPUs,
runs in a process of its own, as `vllm serve` runs it (VLLM_ENABLE_V1_MULTIPROCESSING): the engine thread here
only hands rows over and takes tokens back, so the request threads' Python, under this process's GIL, never
delays a GPU step. That process dies with this one, and if it dies first the engine dies (a thread here
watches), and the worker with it. Without GPUs the core runs in this process by default: vLLM's CPU build would
spawn two processes more. Either way vLLM's CPU build scans every loaded module at start-up, which trips on
Flask's context-local proxies under azmlinfsrv ("Working outside of application context"): here the engine is
built inside a throwaway Flask request context, and in vLLM's own processes a plugin pushes one
(vllm_plugin.py).

vLLM finds plugins by their distribution's entry points, and on Azure the package is not installed (it comes
as the MLflow model's code), so the plugin's entry point ships with the code, as a distribution's metadata
folder that the engine puts on sys.path, which the processes vLLM spawns inherit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral_endpoint.engines.engine import Capacity, EngineThread, Row
from mixtral_endpoint.engines.grammar import GRAMMAR_CACHE_BYTES
from mixtral_endpoint.engines.vllm_plugin import MARK
from mixtral_endpoint.model.placement import VLLM_MEMORY_SHARE, kv_budget, serving_dtype, size, visible_devices
from mixtral_endpoint.protocol.config import DEFAULT_BATCH_SIZE, MAX_NUM_SEQS
from mixtral_endpoint.protocol.errors import ConfigError, DoesNotFit, InternalError
from mixtral_endpoint.protocol.sampling import SamplingSettings, TokenLogprob

if TYPE_CHECKING:
    from mixtral_endpoint.model.checkpoint import Checkpoint
    from mixtral_endpoint.protocol.config import ServerConfig

log = logging.getLogger(__name__)

PLUGIN_METADATA = Path(__file__).resolve().parent / "vllm_plugin_metadata"  # vllm_plugin.py's entry point
_FINISH_REASONS = {"stop": "stop", "length": "length"}  # vLLM's; "abort" never reaches a caller

# vLLM keeps its parallel state (world, tensor and pipeline groups) per process: a second engine in
# the same process, or one closed beside a live one, tears it down under the other (seen in the tests:
# "pipeline model parallel group is not initialized"). So a process holds one vLLM engine, shared by
# every load of the same model with the same settings (Spark loads the model once per UDF, in the
# same worker), and closed by the last of them.
_shared_lock = threading.Lock()
_shared: dict[str, Any] = {}  # "key": the engine arguments, "engine", "users"


class VllmEngine(EngineThread):
    name = "vllm"
    grammar_form = "ebnf"

    def __init__(self, build: Callable[[], Any], *, eos_id: int, context_window: int, vocab_size: int,
                 max_num_seqs: int) -> None:
        """Starts the engine thread, which calls `build` (an LLMEngine); returns once it has."""
        self.eos_id = eos_id
        self.context_window = context_window  # vLLM's max_model_len
        self.vocab_size = vocab_size
        self._rows: dict[str, Row] = {}  # vLLM request id -> row; the engine thread's own
        self._ids = itertools.count()

        def load() -> None:
            self.llm = build()
            # What vLLM allocated, which the core's line spends each row's prompt + max_new_tokens from.
            cache = self.llm.vllm_config.cache_config
            self.capacity = Capacity(rows=max_num_seqs, kv_tokens=cache.num_gpu_blocks * cache.block_size,
                                     block_tokens=cache.block_size)
            log.info("vLLM's KV cache: %d tokens in blocks of %d; up to %d rows at once",
                     self.capacity.kv_tokens, cache.block_size, max_num_seqs)

        super().__init__(load, thread_name="mixtral-vllm")
        # The client of an engine core in its own process (vLLM 0.32's MPClient); none for one in this process.
        core = getattr(getattr(self.llm, "engine_core", None), "resources", None)
        if core is not None:
            threading.Thread(target=self._watch_core, args=(core,), name="mixtral-vllm-core", daemon=True).start()

    def _watch_core(self, core: Any) -> None:
        """The engine core's process exiting is the engine's death. vLLM's client marks it dead, but a step
        already waiting for its outputs waits on for ever (its sync client puts no error in their queue)."""
        while not self._unwatched.wait(1.0):
            if core.engine_dead:
                self._die(InternalError("vLLM's engine core process exited"))
                return

    @classmethod
    def load(cls, checkpoint: Checkpoint, config: ServerConfig) -> VllmEngine:
        args, why = engine_args(checkpoint, config)
        own = config.engine_process == "true" or (config.engine_process == "auto" and _gpus(config) > 0)
        # The same model: Spark and MLflow copy it to a new folder for each load, so compare what it holds.
        key = json.dumps({**args, "model": [checkpoint.config, checkpoint.stored_bytes], "own_process": own},
                         sort_keys=True)
        with _shared_lock:
            if _shared and _shared["engine"].dead is not None:
                log.warning("the vLLM engine of this process died; loading a fresh one")
                _shared.clear()  # its thread has ended and freed its model
            if _shared:
                if _shared["key"] != key:
                    raise ConfigError("a vLLM engine with other settings is already loaded in this process; vLLM "
                                      "runs one engine per process")
                _shared["users"] += 1
                return _shared["engine"]
            log.info("loading %s with vLLM: %s", checkpoint.path, why)
            engine = cls(lambda: _build_llm_engine(args, own_process=own),
                         eos_id=int(checkpoint.config["eos_token_id"]),
                         context_window=args["max_model_len"], vocab_size=int(checkpoint.config["vocab_size"]),
                         max_num_seqs=args["max_num_seqs"])
            _shared.update(key=key, engine=engine, users=1)
            return engine

    def close(self) -> None:
        with _shared_lock:
            if _shared.get("engine") is self:
                _shared["users"] -= 1
                if _shared["users"] > 0:
                    return
                _shared.clear()
        super().close()

    @property
    def row_counts(self) -> tuple[int, int]:
        """(rows in vLLM, rows not yet handed to it)."""
        return len(self._rows), len(self._inbox)

    def _loop(self) -> None:
        while self._next():
            with self._stepping():
                self._step()

    def _drop_in_flight(self) -> list[Row]:
        rows = list(self._rows.values())
        self._rows.clear()
        return rows

    def _unload(self) -> None:
        self.__dict__.pop("llm", None)

    def _next(self) -> bool:
        """Hands newcomers to vLLM and aborts rows that ended early; False once closing."""
        with self._wake:
            while not self._inbox and not self._rows and not self._closing:
                self._wake.wait()
            if self._closing:
                return False
            newcomers = list(self._inbox)
            self._inbox.clear()
        now = time.monotonic()
        for row in newcomers:
            self._add(row, now)
        ended = {rid: row for rid, row in self._rows.items() if row.cancelled or row.expired(now)}
        if ended:
            self.llm.abort_request(list(ended))
            for rid, row in ended.items():
                del self._rows[rid]
                row.finish("cancelled" if row.cancelled else "time_limit")
        return True

    def _add(self, row: Row, now: float) -> None:
        if row.cancelled or row.expired(now):
            row.finish("cancelled" if row.cancelled else "time_limit")
            return
        request_id = str(next(self._ids))
        try:
            # One past the vocabulary would crash vLLM's step: refuse it here, for this row alone.
            if not row.prompt or not all(0 <= t < self.vocab_size for t in row.prompt):
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}) and not empty")
            if len(row.prompt) + row.settings.max_new_tokens > self.context_window:
                raise ValueError("the prompt and max_new_tokens are over the context window")
            self.llm.add_request(request_id, {"prompt_token_ids": row.prompt},
                                 sampling_params(row.settings, self.eos_id, grammar=row.grammar))
        except Exception as exc:  # this row alone fails
            log.error("a row was refused", exc_info=exc)
            row.fail(exc)
            return
        row.started_at = now
        self._rows[request_id] = row

    def _step(self) -> None:
        if not self._rows:
            return
        outputs = self.llm.step()
        now, batch = time.monotonic(), len(self._rows)
        for output in outputs:
            row = self._rows.get(output.request_id)
            if row is None:
                continue
            completion = output.outputs[0]
            if row.settings.prompt_logprobs is not None and output.prompt_logprobs:  # a chunk of them, in order
                done, top = row.prompt_logprobs or [], row.settings.prompt_logprobs
                chunk = zip(row.prompt[len(done):], output.prompt_logprobs, strict=False)
                row.prompt_logprobs = done + [None if entry is None else _token_logprob(entry, token, top)
                                              for token, entry in chunk]
            logprobs = completion.logprobs if row.settings.logprobs is not None else None
            for i, token in enumerate(completion.token_ids):  # the new ones only: RequestOutputKind.DELTA
                logprob = None if logprobs is None else _token_logprob(logprobs[i], token, row.settings.logprobs)
                row.emit(token, now, batch, logprob)
            if output.finished:
                del self._rows[output.request_id]
                reason = _FINISH_REASONS.get(completion.finish_reason)
                if reason is None:
                    row.fail(InternalError(f"vLLM ended the row with {completion.finish_reason!r}"))
                else:
                    row.finish(reason)


def engine_args(checkpoint: Checkpoint, config: ServerConfig) -> tuple[dict[str, Any], str]:
    """vLLM's EngineArgs from the typed config and the sizing plan, and a sentence on the cache.

    The paged cache holds tokens, not rows: on GPU vLLM fills the memory it may take after the weights
    (kv_budget estimates how much, before a byte is loaded); on CPU, where it would take all memory, it
    gets room for MIXTRAL_MAX_BATCH_SIZE rows of the whole window. A cache that cannot hold one row of
    MIXTRAL_MAX_TOTAL_TOKENS is a start-up error; left unset, the window shrinks to what the cache holds.
    """
    import torch

    gpus = _gpus(config)
    share = config.gpu_memory_utilization or VLLM_MEMORY_SHARE
    devices = visible_devices(config, memory_share=share)
    tensor_parallel = config.tensor_parallel_size or max(gpus, 1)
    if tensor_parallel > max(gpus, 1):
        raise ConfigError(f"MIXTRAL_TENSOR_PARALLEL_SIZE is {tensor_parallel}, but {gpus} GPU(s) are visible")
    devices = replace(devices, gpu_bytes=devices.gpu_bytes[:tensor_parallel])
    dtype = serving_dtype(config, devices)
    if checkpoint.quantization and dtype == "float32":  # FP8 kernels take 16-bit activations, on CPU too
        if config.dtype != "auto":
            raise ConfigError(f"MIXTRAL_DTYPE=float32, but {checkpoint.quantization} weights run with bfloat16 or "
                              "float16 activations")
        dtype = "bfloat16"
    window = checkpoint.context_window
    wanted = min(config.max_total_tokens or window, window)
    # Unset, the batch is the plan's on GPUs: rows of a typical length the cache holds, at most MAX_NUM_SEQS.
    rows = config.max_batch_size or (0 if gpus else DEFAULT_BATCH_SIZE)
    budget = kv_budget(checkpoint, devices, dtype=dtype, kv_cache_dtype=config.kv_cache_dtype,
                       max_seqs=rows or MAX_NUM_SEQS, max_tokens=None if gpus else rows * wanted)
    rows = rows or max(budget.max_seqs, 1)
    where = f"{tensor_parallel} GPU(s)" if gpus else "CPU memory"
    if budget.tokens == 0:
        raise DoesNotFit(f"{checkpoint.path}: does not fit: {size(checkpoint.bytes_as(dtype))} of weights leave no "
                         f"room for a KV cache in {where}; use more or larger GPUs, or FP8 weights")
    if budget.tokens < wanted:
        if config.max_total_tokens:
            raise ConfigError(f"MIXTRAL_MAX_TOTAL_TOKENS ({wanted}) is over the {budget.tokens} tokens vLLM's KV "
                              f"cache holds in {where}: lower it, or make room (MIXTRAL_GPU_MEMORY_UTILIZATION, "
                              "MIXTRAL_KV_CACHE_DTYPE=fp8, more GPUs)")
        log.warning("vLLM's KV cache holds %d tokens, under the model's window of %d: a row is held to that",
                    budget.tokens, window)
        wanted = budget.tokens
    args: dict[str, Any] = {
        "model": str(checkpoint.path),
        "tokenizer_mode": "mistral",  # for structured outputs' vocabulary; prompts stay our token ids
        "structured_outputs_config": {"backend": "xgrammar"},  # the grammars grammar.py writes
        "generation_config": "vllm",  # the request's settings, not the checkpoint's sampling defaults
        "dtype": dtype,
        "max_model_len": wanted,
        "max_num_seqs": rows,
        "enable_prefix_caching": config.enable_prefix_caching,
        "kv_cache_dtype": config.kv_cache_dtype,
        "seed": 0,
        "disable_log_stats": True,
    }
    if config.max_num_batched_tokens:
        args["max_num_batched_tokens"] = config.max_num_batched_tokens
    if gpus:
        args["tensor_parallel_size"] = tensor_parallel
        total = torch.cuda.get_device_properties(0).total_memory
        args["gpu_memory_utilization"] = min(devices.gpu_bytes[0] / total, 0.95) if config.max_gpu_memory else share
    else:
        args["enforce_eager"] = True
        args["kv_cache_memory_bytes"] = budget.bytes
    why = (f"{size(checkpoint.bytes_as(dtype))} of weights; a KV cache of about {budget.tokens:,} tokens "
           f"({size(budget.bytes)}) in {where}; rows of up to {wanted} tokens, {rows} at once")
    return args, why


def sampling_params(settings: SamplingSettings, eos_id: int, *, grammar: str | None = None) -> Any:
    """Our frozen settings as vLLM's SamplingParams, by name; `grammar`: settings.constraint as EBNF text."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    assert (settings.constraint is None) == (grammar is None), "a constraint needs its grammar"
    sampled = not settings.greedy
    return SamplingParams(
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature if sampled else 0.0,
        top_p=settings.top_p if sampled else 1.0,
        top_k=settings.top_k if sampled else 0,
        min_p=settings.min_p if sampled else 0.0,
        repetition_penalty=settings.repetition_penalty,
        presence_penalty=settings.presence_penalty,
        frequency_penalty=settings.frequency_penalty,
        logit_bias=dict(settings.logit_bias) or None,
        min_tokens=settings.min_tokens,
        seed=settings.seed if sampled else None,
        # EOS is ours to name (generation_config="vllm"); the EOS token stays in the output, as it does on
        # our engine, and so do the stop token ids.
        stop_token_ids=[*([] if settings.ignore_eos else [eos_id]), *settings.stop_token_ids],
        ignore_eos=settings.ignore_eos,
        logprobs=settings.logprobs,
        prompt_logprobs=settings.prompt_logprobs,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=None if grammar is None else StructuredOutputsParams(grammar=grammar),
    )


def _token_logprob(entry: dict[int, Any], token: int, top: int) -> TokenLogprob:
    """vLLM's log-probabilities at one place ({token id: Logprob with its rank}) as ours: the token's own, and
    the `top` most likely by rank."""
    best = sorted((lp.rank, token_id, lp.logprob) for token_id, lp in entry.items() if lp.rank is not None)
    return TokenLogprob(entry[token].logprob, tuple((token_id, logprob) for _, token_id, logprob in best[:top]))


def _gpus(config: ServerConfig) -> int:
    import torch

    return torch.cuda.device_count() if config.device_map != "cpu" else 0


def _build_llm_engine(args: dict[str, Any], *, own_process: bool) -> Any:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if own_process else "0"  # see above
    os.environ[MARK] = "1"  # our plugin acts in the processes vLLM starts from here
    if str(PLUGIN_METADATA) not in sys.path:
        sys.path.append(str(PLUGIN_METADATA))
    # vLLM keeps the grammars it compiled by their text, up to 512 MB unless told: the budget ours has.
    os.environ.setdefault("VLLM_XGRAMMAR_CACHE_MB", str(GRAMMAR_CACHE_BYTES // 2**20))
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    with _outside_flask():
        return LLMEngine.from_engine_args(EngineArgs(**args))


def _outside_flask() -> contextlib.AbstractContextManager:
    """A throwaway Flask request context, so vLLM's start-up scan of loaded modules can read Flask's
    context-local proxies without raising."""
    try:
        import flask
    except ImportError:
        return contextlib.nullcontext()
    return flask.Flask(__name__).test_request_context()
