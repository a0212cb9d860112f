"""Which engine serves, and loading it: the one module above both engines.

`engine.py` holds the interface both implement; this module alone knows there are two.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixtral_endpoint.protocol.errors import ConfigError

if TYPE_CHECKING:
    from mixtral_endpoint.engines.engine import Engine
    from mixtral_endpoint.model.checkpoint import Checkpoint
    from mixtral_endpoint.protocol.config import ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    name: str  # transformers | vllm
    why: str


def choose_engine(wanted: str, *, gpus: int, vllm_installed: bool) -> EngineChoice:
    """`auto` takes vLLM where it can serve (a GPU and vLLM installed); asking for vLLM where it
    cannot run is an error, never a silent fallback."""
    if wanted == "transformers":
        return EngineChoice("transformers", "MIXTRAL_ENGINE=transformers")
    if wanted == "vllm":
        if not vllm_installed:
            raise ConfigError("MIXTRAL_ENGINE=vllm, but vLLM is not installed in this environment")
        return EngineChoice("vllm", "MIXTRAL_ENGINE=vllm")
    if gpus and vllm_installed:
        return EngineChoice("vllm", f"MIXTRAL_ENGINE=auto: {gpus} GPU(s) visible and vLLM installed")
    reason = "no GPU visible" if not gpus else "vLLM is not installed"
    return EngineChoice("transformers", f"MIXTRAL_ENGINE=auto: {reason}")


def load_engine(checkpoint: Checkpoint, config: ServerConfig) -> Engine:
    """Loads the engine the config asks for, its steps watched for stalls; the log names it and why."""
    import torch

    choice = choose_engine(config.engine, gpus=torch.cuda.device_count(),
                           vllm_installed=importlib.util.find_spec("vllm") is not None)
    log.info("engine: %s (%s)", choice.name, choice.why)
    engine: Engine
    if choice.name == "vllm":
        from mixtral_endpoint.engines.vllm_engine import VllmEngine

        engine = VllmEngine.load(checkpoint, config)
    else:
        from mixtral_endpoint.engines.transformers.transformers_engine import TransformersEngine

        engine = TransformersEngine.load(checkpoint, config)
    engine.watch(config.stall_limit_s)
    return engine
