"""score.py with a test hook from outside the product: once the file named by $POISON_FILE appears,
every forward pass of the model in this process raises, as after a CUDA "illegal memory access"
(which poisons the device until the process ends). The hook deletes the file when it arms, so a fresh
worker starts healthy."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import score  # noqa: E402
from score import run  # noqa: E402, F401  (azmlinfsrv calls this module's run)

_poisoned = False


def init() -> None:
    score.init()
    from transformers.models.mixtral import modeling_mixtral

    classes = [modeling_mixtral.MixtralForCausalLM]
    if score.scorer.engine.name == "vllm":
        from vllm.model_executor.models import mixtral

        classes.append(mixtral.MixtralForCausalLM)
    for cls in classes:
        cls.forward = _poisonable(cls.forward)


def _poisonable(forward):
    def maybe_poisoned(*args, **kwargs):
        global _poisoned
        if not _poisoned and os.path.exists(os.environ["POISON_FILE"]):
            os.remove(os.environ["POISON_FILE"])
            _poisoned = True
        if _poisoned:
            raise RuntimeError("the device is poisoned (a test hook)")
        return forward(*args, **kwargs)

    return maybe_poisoned
