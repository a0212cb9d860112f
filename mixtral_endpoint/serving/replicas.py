"""Engine replicas per instance: one gunicorn worker per replica, each on its own group of GPUs.

On a machine with more GPUs than one replica needs (8 x 80 GB: bf16 Mixtral needs 2 of them, FP8 one), azmlinfsrv
runs `WORKER_COUNT` workers and each worker's `init()` claims a group before anything touches CUDA: it takes a
non-blocking lock on the group's lock file, in a folder all workers of this server share, and then sees only that
group's GPUs (`CUDA_VISIBLE_DEVICES`). The lock is a POSIX record lock (`lockf`), not `flock`: it belongs to the
process, so the children a worker forks (vLLM's GPU workers, ours) never hold it on after the worker. A worker
that dies (its engine died or stalled: exit status 70) releases its lock with its process, so the worker gunicorn
starts in its place claims the same group, while the other workers keep serving. The group's index is the
replica's: the metrics' `engine` label, as vLLM labels its data-parallel engines.

Every worker accepts on the one listening socket; `ReplicaWorker` (gunicorn's gthread worker, named by
`--worker-class`) makes the busier replica the slower to accept, so callers spread by load.

With one worker nothing is claimed and nothing changes. Pure but for the lock files and the GPU count, which is
read without CUDA (the driver's /proc entries, else `nvidia-smi`): CUDA must not start before the group is chosen.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gunicorn.workers.gthread import ThreadWorker

from mixtral_endpoint.protocol.errors import ConfigError

CLAIM_WAIT_S = 10.0  # a replacement may start while its predecessor's exit still holds the lock


@dataclass(frozen=True)
class Replica:
    """The replica this worker serves: its index (the `engine` label), its GPUs, the server's shared folder. The
    entry script logs it: gunicorn imports this module in its master (ReplicaWorker), where azmlinfsrv's logging
    set-up disables the loggers that exist by then."""

    index: int
    count: int  # the replicas of this server (WORKER_COUNT)
    gpus: tuple[str, ...]  # CUDA device ids; empty on a host without GPUs (each worker then holds a CPU copy)
    folder: Path  # shared by every worker of this server start: the locks, and metrics/ (serving/metrics.py)
    lock: IO[bytes]  # held open for the worker's life: the OS releases the lock when the process ends

    @property
    def metrics_folder(self) -> Path:
        return self.folder / "metrics"


def workers(environ: Mapping[str, str]) -> int:
    """azmlinfsrv's WORKER_COUNT: the gunicorn workers, one replica each."""
    raw = environ.get("WORKER_COUNT", "") or "1"
    try:
        count = int(raw)
    except ValueError:
        raise ConfigError(f"WORKER_COUNT must be a whole number of workers, got {raw!r}") from None
    if count < 1:
        raise ConfigError(f"WORKER_COUNT must be >= 1, got {count}")
    return count


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs this server may use, as CUDA device ids, found without starting CUDA: CUDA_VISIBLE_DEVICES where
    set, else one id per GPU the NVIDIA driver lists."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    return [str(i) for i in range(_driver_gpu_count())]


def group_size(gpus: int, workers: int, tensor_parallel_size: int) -> int:
    """GPUs per replica: MIXTRAL_TENSOR_PARALLEL_SIZE, or (0) the largest power of two that gives every worker a
    group (8 GPUs, 4 workers: 2), which is what `mixtral-endpoint plan` tells to set."""
    if tensor_parallel_size:
        return tensor_parallel_size
    share = max(gpus // workers, 1)
    return 1 << (share.bit_length() - 1)


def gpu_groups(gpus: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """The visible GPUs in consecutive groups of `size` (NVLink pairs sit next to each other); a remainder that
    makes no whole group is left unused."""
    return [tuple(gpus[i:i + size]) for i in range(0, len(gpus) - size + 1, size)]


def shared_folder(root: Path | None = None) -> Path:
    """The folder this server's workers share: one per server start, named by the gunicorn master (every worker's
    parent), so a restart of the container starts clean and two servers on one host never meet."""
    return (root or Path(tempfile.gettempdir())) / f"mixtral-endpoint-{os.getppid()}"


def claim(environ: Mapping[str, str], *, tensor_parallel_size: int, folder: Path | None = None,
          wait_s: float = CLAIM_WAIT_S) -> Replica | None:
    """This worker's replica, or None with one worker (nothing changes then). Raises ConfigError where
    WORKER_COUNT asks for more replicas than the GPUs make groups, or where no group is free."""
    count = workers(environ)
    if count == 1:
        return None
    gpus = visible_gpus(environ)
    if gpus:
        size = group_size(len(gpus), count, tensor_parallel_size)
        groups = gpu_groups(gpus, size)
        if len(groups) < count:
            raise ConfigError(
                f"WORKER_COUNT={count} asks for {count} engine replicas, but {len(gpus)} GPU(s) ({','.join(gpus)}) "
                f"make {len(groups)} group(s) of {size} (MIXTRAL_TENSOR_PARALLEL_SIZE="
                f"{tensor_parallel_size or f'0: {size}'}); lower WORKER_COUNT or the GPUs per replica "
                "(mixtral-endpoint plan --gpus N says what fits)")
    else:
        groups = [()] * count  # no GPU: each worker holds its own copy on the CPU; the index still labels it
    folder = folder or shared_folder()
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for index, group in enumerate(groups[:count]):
            lock = (folder / f"replica-{index}.lock").open("wb")
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                lock.close()
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    continue  # another worker's
                raise
            replica = Replica(index, count, group, folder, lock)
            replica.metrics_folder.mkdir(exist_ok=True)
            return replica
        if time.monotonic() >= deadline:
            raise ConfigError(f"every one of the {count} replicas' groups is held by another worker ({folder})")
        time.sleep(0.2)


def _driver_gpu_count() -> int:
    """GPUs the NVIDIA driver lists, without CUDA: /proc/driver/nvidia/gpus, else `nvidia-smi --list-gpus`."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "--list-gpus"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


# How busy this worker's replica is, given the connections the worker holds: its rows (generating and waiting, or
# the connections where more: a caller's request is on its way to the line) over its batch. Set by score.py's init()
# once the engine serves; None before.
load: Callable[[int], float] | None = None
ACCEPT_DELAY_S = 0.005  # per full batch: how much later a busy worker reaches for a new connection than an idle one


class ReplicaWorker(ThreadWorker):
    """gunicorn's gthread worker, slower to accept the busier its replica. Every worker wakes when a connection waits
    on the shared socket and the first to accept it serves it: a busy worker is often first (measured in
    docs/serving.md), so one waits ACCEPT_DELAY_S per batch its replica holds (at most 4) before it reaches for the
    connection, and an idler replica takes the caller. Named by `--worker-class` (GUNICORN_CMD_ARGS)."""

    def accept(self, listener) -> None:  # noqa: ANN001 (gunicorn's listener)
        share = load(self.nr_conns) if load is not None else 0.0
        if share > 0:
            time.sleep(ACCEPT_DELAY_S * min(share, 4.0))
        super().accept(listener)
