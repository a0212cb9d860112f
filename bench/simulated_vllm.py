"""A stand-in for vLLM's model executor that simulates a GPU's step times, for measuring the door and core.

vLLM's own engine drives it (its scheduler, KV cache accounting and output processing, and with
VLLM_ENABLE_V1_MULTIPROCESSING its engine core process, as `vllm serve` and our engine with GPUs run it); only
the forward pass is simulated. Each step sleeps $SIM_STEP_MS + $SIM_ROW_MS per row scheduled (releasing the GIL,
as the host thread does while CUDA runs) and then gives every row whose prompt is all in a token, as a decode step
does. The model is loaded and its cache allocated as vLLM does (the embedded model's: tiny). vLLM is given it as
`distributed_executor_backend="simulated_vllm.SimulatedExecutor"`, with this folder on the PYTHONPATH of the
processes it starts.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from typing import Any

from vllm.v1.executor.uniproc_executor import UniProcExecutor
from vllm.v1.outputs import ModelRunnerOutput

TOKEN = 1781  # one ordinary word piece of the Mistral vocabulary: every token is text a stream can send


class SimulatedExecutor(UniProcExecutor):
    def _init_executor(self) -> None:
        super()._init_executor()
        self.step_s = float(os.environ["SIM_STEP_MS"]) / 1000
        self.row_s = float(os.environ["SIM_ROW_MS"]) / 1000
        self._prompt_tokens: dict[str, int] = {}  # request id -> its prompt's length

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> ModelRunnerOutput | Future:
        for request_id in scheduler_output.finished_req_ids:
            self._prompt_tokens.pop(request_id, None)
        new = scheduler_output.scheduled_new_reqs
        self._prompt_tokens |= {r.req_id: len(r.prompt_token_ids) for r in new}
        computed = {r.req_id: r.num_computed_tokens for r in new}
        cached = scheduler_output.scheduled_cached_reqs
        computed |= dict(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        scheduled = scheduler_output.num_scheduled_tokens  # request id -> tokens this step computes for it
        if scheduled:
            time.sleep(self.step_s + self.row_s * len(scheduled))
        request_ids = list(scheduled)
        output = ModelRunnerOutput(  # a token for each row past its prompt; none for a prompt's first chunks
            req_ids=request_ids, req_id_to_index={r: i for i, r in enumerate(request_ids)},
            sampled_token_ids=[[TOKEN] if computed[r] + scheduled[r] >= self._prompt_tokens[r] else []
                               for r in request_ids])
        if not non_block:
            return output
        future: Future = Future()
        future.set_result(output)
        return future
