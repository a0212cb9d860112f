"""score.py on vLLM's own engine with its model executor replaced, a benchmark hook from outside the product:
vLLM's scheduler, cache and (MIXTRAL_ENGINE_PROCESS) engine core process run as they do on a GPU; only the
forward pass is simulated, by bench/simulated_vllm.py's SimulatedExecutor ($SIM_STEP_MS + $SIM_ROW_MS per row).
Everything else (azmlinfsrv, the door, the core's line, VllmEngine's thread) is the product's own."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mixtral_endpoint.engines import vllm_engine  # noqa: E402

_engine_args = vllm_engine.engine_args


def _over_the_stand_in(checkpoint, config):  # noqa: ANN001, ANN202
    args, why = _engine_args(checkpoint, config)
    return {**args, "distributed_executor_backend": "simulated_vllm.SimulatedExecutor"}, why


vllm_engine.engine_args = _over_the_stand_in

from score import init, run  # noqa: E402, F401  (azmlinfsrv calls this module's init and run)
