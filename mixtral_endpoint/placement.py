"""Where the weights go, decided before a single weight is read.

From the config and the safetensors headers alone: bytes in the serving dtype, the KV cache the
configured batch and context need, and the device map accelerate would choose over the devices
(with each GPU's share of the cache and some headroom held back). `init()` and
`mixtral-endpoint plan` use the same function, so what the plan says is what the server loads.
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

from .checkpoint import TARGET_BYTES, Checkpoint
from .config import ServerConfig

GIB = 1024**3
HEADROOM_PER_GPU = 2 * GIB  # CUDA context, activations and allocator slack


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


def kv_cache_bytes(config: dict, *, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `rows` sequences of `tokens` tokens."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return rows * tokens * 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * dtype_bytes


def plan(checkpoint: Checkpoint, devices: Devices, *, dtype: str, rows: int, tokens: int) -> Plan:
    weights = checkpoint.bytes_as(dtype)
    kv = kv_cache_bytes(checkpoint.config, rows=rows, tokens=tokens, dtype_bytes=TARGET_BYTES[dtype])
    needs = f"{size(weights)} of {dtype} weights + {size(kv)} of KV cache ({rows} x {tokens} tokens)"
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
        f"weights:     {size(result.weights_bytes)} as {result.dtype}",
        f"KV cache:    {rows} rows x {tokens} tokens = {size(result.kv_bytes)} ({per_token / 1024:.1f} KiB per token)",
        f"devices:     {gpus}; CPU {size(devices.cpu_bytes)}; disk {size(devices.disk_bytes)}",
    ]
    if result.device_map:
        lines += [f"placement:   {group}" for group in _groups(result.device_map)]
        lines.append(f"offloaded:   {', '.join(result.offloaded) or 'nothing'}")
    lines.append(f"verdict:     {result.verdict}")
    return "\n".join(lines)


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
    gpus = torch.cuda.device_count() if config.device_map != "cpu" else 0
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if gpus else "float32")
    cap = convert_file_size_to_int(config.max_gpu_memory) if config.max_gpu_memory else None
    gpu_bytes = tuple(min(torch.cuda.mem_get_info(i)[0], cap or 2**62) for i in range(gpus))
    if gpus:
        cpu = convert_file_size_to_int(config.max_cpu_memory) if config.max_cpu_memory else 0
    else:
        cpu = psutil.virtual_memory().available
    disk = shutil.disk_usage(Path(config.offload_folder).resolve().anchor).free if config.offload_folder else 0
    return plan(checkpoint, Devices(gpu_bytes, cpu, disk), dtype=dtype, rows=rows, tokens=tokens)


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
