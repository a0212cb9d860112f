"""Where the weights go, decided before a single weight is read.

From the config and the safetensors headers alone: bytes in the serving dtype, the KV cache the
configured batch and context need, and the device map accelerate would choose over the devices
(with each GPU's share of the cache and some headroom held back). `init()` and
`mixtral-endpoint plan` use the same function, so what the plan says is what the server loads.

Two caches, one per engine. Our engine holds rows x the whole context (`plan`). vLLM's paged cache
holds only the tokens in use, so it is sized as a budget of tokens in the memory the weights leave
(`kv_budget`), and rows are admitted while their prompt + max_new_tokens fit in it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import psutil
import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import convert_file_size_to_int, get_balanced_memory
from transformers import MixtralConfig, MixtralForCausalLM

from mixtral_endpoint.model.checkpoint import TARGET_BYTES, Checkpoint
from mixtral_endpoint.protocol.config import MAX_NUM_SEQS, ServerConfig

GIB = 1024**3
HEADROOM_PER_GPU = 2 * GIB  # CUDA context, activations and allocator slack
# vLLM: the CUDA context, the activations of its profiling step (a chunked prefill through the experts),
# CUDA graphs and NCCL buffers, all held before it sizes its cache.
VLLM_HEADROOM_PER_GPU = 4 * GIB
VLLM_MEMORY_SHARE = 0.9  # vLLM's default gpu_memory_utilization: the share of each GPU it may take
KV_BLOCK_TOKENS = 16  # vLLM's paged-cache block on GPU: a row holds whole blocks
TYPICAL_ROW_TOKENS = 1024  # prompt + max_new_tokens of a typical row, when choosing max_num_seqs
# The gunicorn worker class of a replica's worker (serving/replicas.py; named here, not imported: a lower layer).
WORKER_CLASS = "mixtral_endpoint.serving.replicas.ReplicaWorker"
KV_CACHE_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}  # vLLM's names


@dataclass(frozen=True)
class Devices:
    """Memory the weights and cache may use."""

    gpu_bytes: tuple[int, ...]  # per GPU; empty on a CPU-only host
    cpu_bytes: int  # CPU-only host: all of it; GPU host: room for offloaded weights (0: none)
    disk_bytes: int = 0  # disk offload (0: none)


@dataclass(frozen=True)
class Plan:
    dtype: str
    weights_bytes: int
    kv_bytes: int
    max_memory: dict[int | str, int] | None  # accelerate's caps: per GPU after headroom and cache
    device_map: dict[str, int | str] | None  # module -> device; None on a CPU-only host
    fits: bool
    verdict: str  # one sentence: fits, or needed vs available

    @property
    def offloaded(self) -> list[str]:
        return [m for m, d in (self.device_map or {}).items() if d in ("cpu", "disk")]


@dataclass(frozen=True)
class KvBudget:
    """vLLM's paged KV cache, in tokens: what admission spends a row's prompt + max_new_tokens from."""

    tokens: int  # cache tokens that fit, in whole blocks; 0: the weights leave no room
    max_seqs: int  # sequences at once (vLLM's max_num_seqs): the cap, or fewer where rows of the length asked fill it
    bytes: int  # the cache over all devices (vLLM's kv_cache_memory_bytes where it is given in bytes)


def kv_cache_bytes(config: dict, *, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `rows` sequences of `tokens` tokens."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return rows * tokens * 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * dtype_bytes


def kv_cache_dtype_bytes(kv_cache_dtype: str, dtype: str) -> int:
    """Bytes per cached element: vLLM's kv_cache_dtype ("auto": the serving dtype; "fp8": one byte)."""
    if kv_cache_dtype == "auto":
        return TARGET_BYTES[dtype]
    if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPE_BYTES)}; "
                         f"got {kv_cache_dtype!r}")
    return KV_CACHE_DTYPE_BYTES[kv_cache_dtype]


def kv_budget(checkpoint: Checkpoint, devices: Devices, *, dtype: str, kv_cache_dtype: str = "auto",
              row_tokens: int = TYPICAL_ROW_TOKENS, max_seqs: int = MAX_NUM_SEQS,
              max_tokens: int | None = None) -> KvBudget:
    """How many tokens of KV cache vLLM holds in the memory the weights leave. Pure: no device is touched.

    `devices.gpu_bytes` is the memory vLLM may take on each GPU (total x gpu_memory_utilization, or the
    server's cap). With tensor parallelism over all of them each GPU holds 1/N of the weights and of
    every token's key/value heads (whole heads: past num_key_value_heads GPUs they are replicated), so
    the tightest GPU sets the budget after VLLM_HEADROOM_PER_GPU. On a CPU-only host the budget is
    what `cpu_bytes` leaves after the weights. `max_seqs` is capped by how many rows of `row_tokens`
    (rounded up to whole blocks) the budget holds, and is at least 1 while any token fits. `max_tokens`
    caps the cache (on CPU, where it would otherwise take every byte the weights leave).
    """
    config = checkpoint.config
    element = kv_cache_dtype_bytes(kv_cache_dtype, dtype)
    weights = checkpoint.bytes_as(dtype)
    if devices.gpu_bytes:
        gpus = len(devices.gpu_bytes)
        heads = _ceil_div(config["num_key_value_heads"], gpus)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        per_token = 2 * config["num_hidden_layers"] * heads * head_dim * element  # on each GPU
        room = min(g - VLLM_HEADROOM_PER_GPU - _ceil_div(weights, gpus) for g in devices.gpu_bytes)
    else:
        gpus = 1
        per_token = kv_cache_bytes(config, rows=1, tokens=1, dtype_bytes=element)
        room = devices.cpu_bytes - weights
    tokens = max(room, 0) // per_token
    if max_tokens is not None:
        tokens = min(tokens, _whole_blocks(max_tokens))
    tokens = tokens // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
    seqs = min(max_seqs, max(tokens // _whole_blocks(row_tokens), 1)) if tokens else 0
    return KvBudget(tokens=tokens, max_seqs=seqs, bytes=tokens * per_token * gpus)


@dataclass(frozen=True)
class ReplicaPlan:
    """Engine replicas of one instance on vLLM: each on its own group of `tensor_parallel` GPUs, one gunicorn
    worker each (serving/replicas.py)."""

    tensor_parallel: int  # GPUs per replica; 0: no group of the instance's GPUs holds the weights
    replicas: int  # WORKER_COUNT
    weights_per_gpu: int
    budget: KvBudget  # each replica's cache
    refused: tuple[str, ...]  # why each smaller group does not do


def replica_plan(checkpoint: Checkpoint, *, gpus: int, gpu_bytes: int, dtype: str, kv_cache_dtype: str = "auto",
                 memory_share: float = VLLM_MEMORY_SHARE, row_tokens: int = TYPICAL_ROW_TOKENS) -> ReplicaPlan:
    """The smallest power-of-two group of GPUs whose vLLM cache, after its share of the weights, holds a row of the
    whole context window (vLLM would lower its max_model_len otherwise), and as many replicas as the instance has
    such groups. Fewer GPUs per replica means more replicas: a replica's batch costs each step about the same
    weight reads, so the instance's throughput grows with the replicas while each has a useful cache."""
    refused = []
    group = 1
    usable = int(gpu_bytes * memory_share)
    while group <= gpus:
        budget = kv_budget(checkpoint, Devices((usable,) * group, 0), dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                           row_tokens=row_tokens)
        weights = _ceil_div(checkpoint.bytes_as(dtype), group)
        if budget.tokens >= checkpoint.context_window:
            return ReplicaPlan(group, gpus // group, weights, budget, tuple(refused))
        room = usable - VLLM_HEADROOM_PER_GPU
        refused.append(f"{group} GPU(s) per replica would not do: {size(weights)} of weights on each GPU, of the "
                       f"{size(room)} vLLM may use there after {size(VLLM_HEADROOM_PER_GPU)} headroom, "
                       + (f"leaves a cache of {budget.tokens:,} tokens, under one "
                          f"{checkpoint.context_window:,}-token window" if weights < room else "do not fit"))
        group *= 2
    return ReplicaPlan(0, 0, 0, KvBudget(0, 0, 0), tuple(refused))


def describe_replicas(result: ReplicaPlan, *, gpus: int, max_queue: int, row_tokens: int) -> str:
    """The replicas part of `mixtral-endpoint plan`: what fits, why, and the settings that deploy it."""
    lines = [f"replicas:    {why}" for why in result.refused]
    if not result.replicas:
        lines.append(f"replicas:    none: no group of the {gpus} GPU(s) holds the weights and a whole window")
        return "\n".join(lines)
    budget = result.budget
    spare = gpus - result.replicas * result.tensor_parallel
    rows = budget.tokens // _whole_blocks(row_tokens)
    lines += [
        f"replicas:    {result.replicas} x tensor parallel {result.tensor_parallel} on {gpus} GPU(s)"
        + (f" ({spare} left unused)" if spare else "") + f": each GPU holds {size(result.weights_per_gpu)} of weights; "
        f"each replica's cache {budget.tokens:,} tokens ({size(budget.bytes)}), {rows} "
        f"rows of {row_tokens} tokens, max_num_seqs {budget.max_seqs}",
        # One worker per replica; each takes at most its batch and queue of connections, and the busier is the
        # slower to take one (docs/serving.md).
        f"deploy:      WORKER_COUNT={result.replicas} MIXTRAL_TENSOR_PARALLEL_SIZE={result.tensor_parallel} "
        f"MIXTRAL_MAX_BATCH_SIZE={budget.max_seqs} GUNICORN_CMD_ARGS=\"--threads {budget.max_seqs + max_queue} "
        f"--worker-connections {budget.max_seqs + max_queue} --worker-class {WORKER_CLASS}\"",
    ]
    return "\n".join(lines)


def plan(checkpoint: Checkpoint, devices: Devices, *, dtype: str, rows: int, tokens: int) -> Plan:
    weights = checkpoint.bytes_as(dtype)
    kv = kv_cache_bytes(checkpoint.config, rows=rows, tokens=tokens, dtype_bytes=TARGET_BYTES[dtype])
    stored = f"{checkpoint.quantization} weights as stored" if checkpoint.quantization else f"{dtype} weights"
    needs = f"{size(weights)} of {stored} + {size(kv)} of KV cache ({rows} x {tokens} tokens)"
    if not devices.gpu_bytes:
        fits = weights + kv <= devices.cpu_bytes
        verdict = (f"{'fits' if fits else 'does not fit'}: {needs} = {size(weights + kv)}, "
                   f"{size(devices.cpu_bytes)} of CPU memory available")
        return Plan(dtype, weights, kv, None, None, fits, verdict)
    gpus = len(devices.gpu_bytes)
    budgets = [g - HEADROOM_PER_GPU - kv // gpus for g in devices.gpu_bytes]
    usable = sum(g - HEADROOM_PER_GPU for g in devices.gpu_bytes)
    if min(budgets) <= 0:
        verdict = (f"does not fit: the KV cache alone ({size(kv)}) is over the {size(usable)} usable on "
                   f"{gpus} GPU(s); lower MIXTRAL_MAX_BATCH_SIZE or MIXTRAL_MAX_TOTAL_TOKENS")
        return Plan(dtype, weights, kv, None, None, False, verdict)
    if checkpoint.quantization:
        # Only vLLM serves it, and places it itself: every GPU holds 1/N of the weights (tensor parallel).
        fits = _ceil_div(weights, gpus) <= min(budgets)
        verdict = (f"{'fits' if fits else 'does not fit'}: {needs} = {size(weights + kv)}, split over {gpus} GPU(s) "
                   f"by tensor parallelism, {size(usable)} usable" + ("" if fits else "; use more or larger GPUs"))
        return Plan(dtype, weights, kv, None, None, fits, verdict)
    max_memory: dict[int | str, int] = {i: b for i, b in enumerate(budgets)}
    max_memory["cpu"] = devices.cpu_bytes
    if devices.disk_bytes:
        max_memory["disk"] = devices.disk_bytes
    device_map = _device_map(checkpoint, max_memory, dtype)
    places = Counter(device_map.values())
    spilled = places.get("cpu", 0) + places.get("disk", 0)
    fits = weights <= sum(max_memory.values()) and not (places.get("disk") and not devices.disk_bytes)
    where = ", ".join(f"{n} on {'GPU ' + str(d) if isinstance(d, int) else d}" for d, n in sorted(
        places.items(), key=str))
    if fits:
        verdict = (f"fits: {needs} on {gpus} GPU(s) with {size(usable)} usable; modules {where}"
                   + (f"; {spilled} offloaded (slower)" if spilled else ""))
    else:
        verdict = (f"does not fit: {needs} = {size(weights + kv)}, but {gpus} GPU(s) have {size(usable)} usable"
                   + (f" and {size(devices.cpu_bytes)} of CPU offload" if devices.cpu_bytes else "")
                   + "; use a larger instance, more GPUs, or allow CPU/disk offload")
    return Plan(dtype, weights, kv, max_memory, device_map, fits, verdict)


def describe(checkpoint: Checkpoint, devices: Devices, result: Plan, *, rows: int, tokens: int) -> str:
    """The plan as `mixtral-endpoint plan` prints it."""
    per_token = kv_cache_bytes(checkpoint.config, rows=1, tokens=1, dtype_bytes=TARGET_BYTES[result.dtype])
    stored = ", ".join(f"{d} {size(n)}" for d, n in sorted(checkpoint.bytes_by_dtype.items()))
    gpus = (f"{len(devices.gpu_bytes)} x GPU {size(devices.gpu_bytes[0])} ({size(HEADROOM_PER_GPU)} headroom each)"
            if devices.gpu_bytes else "no GPU")
    lines = [
        f"checkpoint:  {checkpoint.path} ({checkpoint.parameters / 1e9:.2f} B parameters, {len(checkpoint.shards)} "
        "shards)",
        f"stored:      {stored}",
        f"weights:     {size(result.weights_bytes)} as {result.dtype}" + (
            f" (quantized, {checkpoint.quantization}: 8-bit tensors as stored; only vLLM serves it)"
            if checkpoint.quantization else ""),
        f"KV cache:    {rows} rows x {tokens} tokens = {size(result.kv_bytes)} ({per_token / 1024:.1f} KiB per token)",
        f"devices:     {gpus}; CPU {size(devices.cpu_bytes)}; disk {size(devices.disk_bytes)}",
    ]
    if result.device_map:
        lines += [f"placement:   {group}" for group in _groups(result.device_map)]
        lines.append(f"offloaded:   {', '.join(result.offloaded) or 'nothing'}")
    lines.append(f"verdict:     {result.verdict}")
    return "\n".join(lines)


def describe_kv(checkpoint: Checkpoint, devices: Devices, budget: KvBudget, *, dtype: str, kv_cache_dtype: str,
                prompt_tokens: int, new_tokens: int) -> str:
    """vLLM's side of `mixtral-endpoint plan`: the budget from `kv_budget(..., row_tokens=prompt + new)`."""
    element = kv_cache_dtype_bytes(kv_cache_dtype, dtype)
    kind = kv_cache_dtype if kv_cache_dtype != "auto" else dtype
    gpus = len(devices.gpu_bytes)
    where = (f"{gpus} x {size(devices.gpu_bytes[0])}, each after {size(_ceil_div(checkpoint.bytes_as(dtype), gpus))} "
             f"of weights and {size(VLLM_HEADROOM_PER_GPU)} headroom" if gpus else "CPU memory after the weights")
    per_token = kv_cache_bytes(checkpoint.config, rows=1, tokens=1, dtype_bytes=element)
    row = prompt_tokens + new_tokens
    held = budget.tokens // _whole_blocks(row)
    lines = [f"vLLM cache:  {budget.tokens:,} tokens of {kind} KV ({per_token / 1024:.1f} KiB each) = "
             f"{size(budget.bytes)}, in {where}"]
    if held >= 1:
        capped = f"; max_num_seqs caps the batch at {budget.max_seqs}" if held > budget.max_seqs else ""
        lines.append(f"rows:        {held} of {prompt_tokens} + {new_tokens} tokens fit in the cache{capped}")
    else:
        lines.append(f"rows:        none: one row of {prompt_tokens} + {new_tokens} tokens is over the "
                     f"{budget.tokens:,}-token cache")
    return "\n".join(lines)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _whole_blocks(tokens: int) -> int:
    """Cache tokens a row of `tokens` occupies: vLLM gives it whole blocks."""
    return _ceil_div(max(tokens, 1), KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def _groups(device_map: dict[str, int | str]) -> list[str]:
    """Consecutive modules on the same device, as 'first .. last -> device'."""
    groups: list[list] = []
    for module, device in device_map.items():
        if groups and groups[-1][2] == device:
            groups[-1][1] = module
        else:
            groups.append([module, module, device])
    return [f"{a or 'the whole model'}{' .. ' + b if b != a else ''} -> {'GPU ' + str(d) if isinstance(d, int) else d}"
            for a, b, d in groups]


def plan_placement(checkpoint: Checkpoint, config: ServerConfig, *, rows: int, tokens: int) -> Plan:
    """The plan for the devices this process sees, under the server's caps."""
    devices = visible_devices(config)
    return plan(checkpoint, devices, dtype=serving_dtype(config, devices), rows=rows, tokens=tokens)


def visible_devices(config: ServerConfig, *, memory_share: float | None = None) -> Devices:
    """The memory this process may use on each GPU it sees: what is free, under MIXTRAL_MAX_GPU_MEMORY.

    `memory_share` (vLLM's gpu_memory_utilization, e.g. VLLM_MEMORY_SHARE) bounds each GPU at that share of
    its total where no cap is set: what vLLM will take, and so what `kv_budget` should be given.
    """
    gpus = torch.cuda.device_count() if config.device_map != "cpu" else 0
    cap = convert_file_size_to_int(config.max_gpu_memory) if config.max_gpu_memory else None
    gpu_bytes = []
    for i in range(gpus):
        free, total = torch.cuda.mem_get_info(i)
        limit = cap or (int(total * memory_share) if memory_share else free)
        gpu_bytes.append(min(free, limit))
    if gpus:
        cpu = convert_file_size_to_int(config.max_cpu_memory) if config.max_cpu_memory else 0
    else:
        cpu = psutil.virtual_memory().available
    disk = shutil.disk_usage(Path(config.offload_folder).resolve().anchor).free if config.offload_folder else 0
    return Devices(tuple(gpu_bytes), cpu, disk)


def serving_dtype(config: ServerConfig, devices: Devices) -> str:
    """MIXTRAL_DTYPE, or for auto: bfloat16 on GPU, float32 on CPU."""
    return config.dtype if config.dtype != "auto" else ("bfloat16" if devices.gpu_bytes else "float32")


def _device_map(checkpoint: Checkpoint, max_memory: dict[int | str, int], dtype: str) -> dict[str, int | str]:
    """accelerate's placement of the model's modules, on an empty (meta) model: no weights read."""
    model = _empty_model(json.dumps(checkpoint.config, sort_keys=True))
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)  # "device N is not available" off-GPU
    no_split, torch_dtype = model._no_split_modules, getattr(torch, dtype)
    # Spread the layers evenly over the GPUs, as device_map="auto" does, rather than filling GPU 0 first.
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch_dtype)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=torch_dtype)


@cache
def _empty_model(config_json: str) -> MixtralForCausalLM:
    config = MixtralConfig(**{k: v for k, v in json.loads(config_json).items() if k != "model_type"})
    with init_empty_weights():
        return MixtralForCausalLM(config)


def size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 1024**2:.1f} MiB"
