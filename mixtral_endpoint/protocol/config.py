"""Server settings: one typed object, built explicitly from the environment in init()."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import NoReturn

from mixtral_endpoint.protocol.errors import ConfigError
from mixtral_endpoint.protocol.request import RequestLimits

PREFIX = "MIXTRAL_"
MODEL_NAME = "mixtral-8x7b"  # the served model's name: the OpenAI routes' model id, the metrics' model_name
DEFAULT_MAX_NEW_TOKENS = 256  # a request's max_new_tokens when neither it nor the server sets one
DEFAULT_BATCH_SIZE = 8  # rows stepped together on our engine, and on vLLM without a GPU, when none is set
MAX_NUM_SEQS = 256  # the most rows vLLM steps at once when the plan chooses (its own default on an A100)
DEADLINE_GRACE_S = 30.0  # past a row's deadline, a wait this much longer means the engine is stuck
# Settings that take one of a fixed set of values: anything else is a start-up error naming them.
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "device_map": ("auto", "cpu"),
    "engine": ("auto", "transformers", "vllm"),
    "kv_cache_dtype": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "engine_process": ("auto", "true", "false"),
}
# The most rows MIXTRAL_MAX_QUEUE may let wait (16 x the largest batch the deployment files run).
MAX_QUEUE_LIMIT = 4096
# vLLM's own engine settings: left at their defaults on our engine, or a start-up error names them.
VLLM_ONLY = ("gpu_memory_utilization", "tensor_parallel_size", "max_num_batched_tokens", "kv_cache_dtype",
             "engine_process")
# Settings also read under the names Azure's catalog container uses (the MIXTRAL_ name wins when both are set).
ALIASES = {"content_safety_endpoint": "CONTENT_SAFETY_ENDPOINT", "content_safety_threshold": "CONTENT_SAFETY_THRESHOLD",
           "content_safety_key": "CONTENT_SAFETY_KEY"}


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    # Weights and placement.
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; or bfloat16 / float16 / float32
    device_map: str = "auto"  # accelerate placement over every visible GPU; "cpu" forces the CPU
    max_gpu_memory: str = ""  # per-GPU cap for accelerate, e.g. "75GiB"; empty: what the GPU has
    max_cpu_memory: str = ""  # cap for weights offloaded to CPU RAM; empty: no CPU offload on GPU hosts
    offload_folder: str = ""  # disk offload for weights that fit nowhere else; empty: none
    engine: str = "auto"  # what generates: auto, transformers (our engine) or vllm
    # Request limits.
    max_new_tokens: int = 1024  # cap on a request's max_new_tokens
    default_max_new_tokens: int = 0  # 0: DEFAULT_MAX_NEW_TOKENS, or max_new_tokens when that is lower
    max_total_tokens: int = 0  # prompt + new tokens; 0: the model's context window
    max_prompts: int = 16  # text prompts in one request (lm-evaluation-harness batches 16)
    max_body_bytes: int = 1_048_576
    # Serving: continuous batching, backpressure and deadlines.
    # Rows generated together in one step (vLLM's max_num_seqs); 0: DEFAULT_BATCH_SIZE, or on vLLM with GPUs
    # the rows of a typical length its KV cache holds, at most MAX_NUM_SEQS.
    max_batch_size: int = 0
    max_queue: int = 16  # rows waiting for a place in the batch; past it, 429
    request_timeout_s: float = 170.0  # per-request deadline, below Azure's 180 s request_timeout_ms
    # A step of the engine that has not returned after this long is a stall: the engine dies and the worker is
    # replaced. 0: request_timeout_s + DEADLINE_GRACE_S, by when every row in that step has failed anyway.
    stall_timeout_s: float = 0.0
    # vLLM's engine (MIXTRAL_ENGINE=vllm); the checkpoint's own quantization config is read by vLLM.
    gpu_memory_utilization: float = 0.0  # share of each GPU vLLM takes; 0: 0.9, or MIXTRAL_MAX_GPU_MEMORY's share
    tensor_parallel_size: int = 0  # GPUs the weights are split over; 0: every visible GPU
    enable_prefix_caching: bool = True  # reuse the cache of a prompt prefix seen before (a chat's history)
    max_num_batched_tokens: int = 0  # tokens one step computes (chunked prefill); 0: vLLM's default
    kv_cache_dtype: str = "auto"  # auto: the serving dtype; fp8 halves the cache per token
    # vLLM's engine core (its scheduler and the GPU's loop) in a process of its own, as `vllm serve` runs it, so
    # the door's threads never hold it back; auto: with GPUs (on CPU it would spawn two processes more).
    engine_process: str = "auto"
    # Moderation (serving/safety.py): screening with Azure AI Content Safety, and Mistral's guardrail prompt.
    content_safety_endpoint: str = ""  # empty: no screening; also read from CONTENT_SAFETY_ENDPOINT
    content_safety_threshold: int = 2  # a severity over it flags (levels 0, 2, 4, 6); also CONTENT_SAFETY_THRESHOLD
    content_safety_key: str = field(default="", repr=False)  # empty: the managed identity; also CONTENT_SAFETY_KEY
    content_safety_fail_open: bool = False  # serve when screening fails, rather than refuse (503)
    safe_prompt: bool = False  # the guardrail prompt for every conversation that does not set safe_prompt
    # Azure ML model data collection (serving/collector.py), when the deployment's data_collector block enables it.
    data_collection: bool = True
    # Logging.
    log_prompts: bool = False

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                _refuse(f"{_var(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("max_new_tokens", "max_prompts", "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                _refuse(f"{_var(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("default_max_new_tokens", "max_total_tokens", "max_batch_size", "tensor_parallel_size",
                     "max_num_batched_tokens", "content_safety_threshold"):
            if getattr(self, name) < 0:
                _refuse(f"{_var(name)} must be >= 0, got {getattr(self, name)}")
        if not (0 < self.request_timeout_s < math.inf):  # also refuses nan, which every comparison fails
            _refuse(f"{_var('request_timeout_s')} must be a finite number > 0, got {self.request_timeout_s}")
        if not (0 <= self.stall_timeout_s < math.inf):
            _refuse(f"{_var('stall_timeout_s')} must be a finite number >= 0, got {self.stall_timeout_s}")
        if not (0 <= self.gpu_memory_utilization <= 1):
            _refuse(f"{_var('gpu_memory_utilization')} must be in [0, 1], got {self.gpu_memory_utilization}")
        if self.gpu_memory_utilization and self.max_gpu_memory:
            _refuse(f"set {_var('gpu_memory_utilization')} or {_var('max_gpu_memory')}, not both: each sets the "
                    "memory vLLM takes on each GPU")
        if self.max_num_batched_tokens and self.max_num_batched_tokens < (self.max_batch_size or MAX_NUM_SEQS):
            _refuse(f"{_var('max_num_batched_tokens')} ({self.max_num_batched_tokens}) is below "
                    f"{_var('max_batch_size')} ({self.max_batch_size or MAX_NUM_SEQS}): a step decodes a token for "
                    "every row")
        if self.max_queue > MAX_QUEUE_LIMIT:
            _refuse(f"{_var('max_queue')} ({self.max_queue}) is above {MAX_QUEUE_LIMIT}: each waiting row holds a "
                    "caller's thread and its prompt, and a queue that long waits past any request deadline")
        if self.max_prompts > self.max_queue:
            _refuse(f"{_var('max_prompts')} ({self.max_prompts}) is above {_var('max_queue')} ({self.max_queue}): "
                    "such a request could never be queued")
        if self.default_max_new_tokens > self.max_new_tokens:
            _refuse(f"{_var('default_max_new_tokens')} ({self.default_max_new_tokens}) is above "
                    f"{_var('max_new_tokens')} ({self.max_new_tokens})")
        default = self.limits.default_max_new_tokens
        if self.max_total_tokens and default >= self.max_total_tokens:
            _refuse(f"{_var('max_total_tokens')} ({self.max_total_tokens}) leaves no room for a prompt beside the "
                    f"default max_new_tokens ({default}): lower {_var('default_max_new_tokens')}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServerConfig:
        """Reads MIXTRAL_<FIELD> variables; unset ones keep their defaults."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper()) or environ.get(ALIASES.get(f.name, ""))
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                _refuse(f"{_var(f.name)} must be a {kind.__name__}, got {raw!r}")
        return cls(**values)

    def vllm_settings(self) -> list[str]:
        """The vLLM-only settings this config sets, by variable name."""
        default = type(self)()
        return [_var(name) for name in VLLM_ONLY if getattr(self, name) != getattr(default, name)]

    @property
    def stall_limit_s(self) -> float:
        """How long one engine step may run before the engine counts as stalled."""
        return self.stall_timeout_s or self.request_timeout_s + DEADLINE_GRACE_S

    @property
    def limits(self) -> RequestLimits:
        # Setting only the cap lowers the default with it, rather than failing at start-up.
        default = self.default_max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens)
        return RequestLimits(max_new_tokens=self.max_new_tokens, default_max_new_tokens=default,
                             max_prompts=self.max_prompts)


def _var(name: str) -> str:
    return PREFIX + name.upper()


def _refuse(message: str) -> NoReturn:
    raise ConfigError(message) from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
