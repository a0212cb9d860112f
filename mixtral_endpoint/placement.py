"""Where the weights go: dtype, accelerate's device map and memory caps, and the check that they fit."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from accelerate.utils import convert_file_size_to_int

from .checkpoint import Checkpoint
from .config import ServerConfig
from .errors import DoesNotFit

GIB = 1024**3


@dataclass(frozen=True)
class Placement:
    dtype: str
    device_map: str | None  # None: everything on the CPU, no accelerate hooks
    max_memory: dict[int | str, int] | None
    offload_folder: str | None
    available_bytes: int


def plan_placement(config: ServerConfig) -> Placement:
    gpus = torch.cuda.device_count() if config.device_map != "cpu" else 0
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if gpus else "float32")
    offload = config.offload_folder or None
    if not gpus:
        return Placement(dtype, None, None, None, psutil.virtual_memory().available)
    cap = convert_file_size_to_int(config.max_gpu_memory) if config.max_gpu_memory else None
    max_memory: dict[int | str, int] = {}
    for i in range(gpus):
        free, _ = torch.cuda.mem_get_info(i)
        max_memory[i] = min(free, cap) if cap else free
    max_memory["cpu"] = convert_file_size_to_int(config.max_cpu_memory) if config.max_cpu_memory else 0
    available = sum(max_memory.values())
    if offload:
        available += shutil.disk_usage(Path(offload).resolve().anchor).free
    return Placement(dtype, config.device_map, max_memory, offload, available)


def check_fits(checkpoint: Checkpoint, placement: Placement) -> None:
    """Refuses, before loading, weights that need more memory than the placement allows."""
    needed = checkpoint.bytes_as(placement.dtype)
    if needed > placement.available_bytes:
        raise DoesNotFit(
            f"the weights of {checkpoint.path} need {size(needed)} in {placement.dtype}, but only "
            f"{size(placement.available_bytes)} is available "
            f"({'GPU caps ' + str(placement.max_memory) if placement.max_memory else 'free CPU memory'}); "
            "use a larger instance, more GPUs, or set MIXTRAL_MAX_CPU_MEMORY / MIXTRAL_OFFLOAD_FOLDER to offload"
        )


def size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 1024**2:.1f} MiB"
