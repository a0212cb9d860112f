"""FP8 weights end to end on vLLM's CPU build: a tiny FP8 checkpoint, packaged, served by a real azmlinfsrv."""

from __future__ import annotations

from pathlib import Path

import requests
import torch
import yaml
from transformers import GenerationConfig, MixtralForCausalLM

from mixtral_endpoint.doors.mlflow_model.packager import package_model
from mixtral_endpoint.model.tokenizer import PromptTokenizer
from tests.localserver import LocalServer

from .conftest import SERVER_ENV
from .fp8_checkpoint import quantize_fp8

# Its 8 greedy tokens on the unquantized model win by at least 0.75 logits: FP8's rounding cannot flip them
# (after "The capital of France is" the sixth wins by 0.02, and FP8 flips it).
PROMPT = "Hello there"


def test_vllm_serves_a_packaged_fp8_checkpoint(tiny_checkpoint: Path, tokenizer: PromptTokenizer, tmp_path: Path):
    model_dir = package_model(quantize_fp8(tiny_checkpoint, tmp_path / "tiny-fp8"), tmp_path / "model")
    assert yaml.safe_load((model_dir / "MLmodel").read_text())["metadata"]["quantization"] == "compressed-tensors"
    log = tmp_path / "azmlinfsrv.log"
    server = LocalServer(model_dir, log, {**SERVER_ENV, "MIXTRAL_ENGINE": "vllm"}, threads=2)
    if not torch.cpu._is_amx_tile_supported():
        # vLLM's CPU build has FP8 kernels only for CPUs with AMX: the server refuses at start-up, naming what
        # is missing (with AVX-512, the MoE kernel; with AVX2 only, the linear layers' already).
        assert not server.wait_ready(timeout=300)
        server.stop()
        text = log.read_text()
        assert "FP8 MoE backend" in text or "requires AMX tile support" in text
        return
    with server:
        body = {"input_data": {"input_string": [PROMPT]},
                "parameters": {"max_new_tokens": 8, "ignore_eos": True, "return_token_ids": True}}
        response = requests.post(server.url + "/score", json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = response.json()[0]["token_ids"]
    assert "compressed-tensors" in log.read_text()
    # The same greedy tokens as the unquantized model.
    ids = tokenizer.encode_text(PROMPT)
    model = MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=2)
    with torch.inference_mode():
        expected = model.generate(input_ids=torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    assert got == expected
