"""score.py with two test hooks from outside the product, each armed by a file appearing:

- $POISON_FILE: every forward pass of the model in this process raises, as after a CUDA "illegal memory
  access" (which poisons the device until the process ends);
- $STALL_FILE: the next forward pass blocks for good, as on a hung GPU or a collective waiting on a dead peer.

A hook deletes its file when it arms, so a fresh worker starts healthy."""

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import score  # noqa: E402
from score import run  # noqa: E402, F401  (azmlinfsrv calls this module's run)

_armed: set[str] = set()


def init() -> None:
    score.init()
    from transformers.models.mixtral import modeling_mixtral

    classes = [modeling_mixtral.MixtralForCausalLM]
    if score.scorer.engine.name == "vllm":
        from vllm.model_executor.models import mixtral

        classes.append(mixtral.MixtralForCausalLM)
    for cls in classes:
        cls.forward = _hooked(cls.forward)


def _hooked(forward):
    def maybe_broken(*args, **kwargs):
        if _armed_by("POISON_FILE"):
            raise RuntimeError("the device is poisoned (a test hook)")
        if _armed_by("STALL_FILE"):
            threading.Event().wait()  # for ever: only the worker's exit ends this thread
        return forward(*args, **kwargs)

    return maybe_broken


def _armed_by(variable: str) -> bool:
    path = os.environ.get(variable)
    if variable not in _armed and path and os.path.exists(path):
        os.remove(path)
        _armed.add(variable)
    return variable in _armed
