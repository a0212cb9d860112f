"""A stand-in for vLLM's LLMEngine that simulates a GPU's step times, for measuring the door and core.

Each step sleeps `step_s + row_s x rows` (releasing the GIL, as the host thread does while CUDA runs)
and then gives every running row one token, as a decode step does. Its cache is what the sizing asked
for: max_num_seqs rows of max_model_len tokens. It answers only what `VllmEngine` calls.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

TOKEN = 1781  # one ordinary word piece of the Mistral vocabulary: every token is text a stream can send
BLOCK_TOKENS = 16


class SimulatedLLM:
    def __init__(self, args: dict[str, Any], *, step_s: float, row_s: float) -> None:
        self.step_s, self.row_s = step_s, row_s
        self._left: dict[str, int] = {}  # request id -> tokens it may still generate
        blocks = args["max_num_seqs"] * args["max_model_len"] // BLOCK_TOKENS
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=blocks,
                                                                        block_size=BLOCK_TOKENS))
        self.steps = 0
        self.tokens = 0

    def add_request(self, request_id: str, prompt: dict, params: Any) -> None:
        self._left[request_id] = params.max_tokens

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._left.pop(request_id, None)

    def step(self) -> list[SimpleNamespace]:
        time.sleep(self.step_s + self.row_s * len(self._left))
        outputs = []
        for request_id in list(self._left):
            self._left[request_id] -= 1
            finished = self._left[request_id] == 0
            if finished:
                del self._left[request_id]
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished, outputs=[SimpleNamespace(
                token_ids=[TOKEN], finish_reason="length" if finished else None)]))
        self.steps += 1
        self.tokens += len(outputs)
        return outputs
