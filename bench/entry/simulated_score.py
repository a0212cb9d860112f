"""score.py on vLLM's engine with a benchmark hook from outside the product: vLLM's LLMEngine is replaced
by SimulatedLLM, stepping in $SIM_STEP_MS + $SIM_ROW_MS per row. Everything else (azmlinfsrv, the door,
the core's line, VllmEngine's thread) is the product's own."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulated_vllm import SimulatedLLM  # noqa: E402

from mixtral_endpoint.engines import vllm_engine  # noqa: E402

vllm_engine._build_llm_engine = lambda args, **_: SimulatedLLM(
    args, step_s=float(os.environ["SIM_STEP_MS"]) / 1000, row_s=float(os.environ["SIM_ROW_MS"]) / 1000)

from score import init, run  # noqa: E402, F401  (azmlinfsrv calls this module's init and run)
