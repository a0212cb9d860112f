"""A tiny FP8 checkpoint, quantized as vLLM's CPU build can serve it: compressed-tensors with 128 x 128-block
F8_E4M3 weights (a float32 scale per block) and dynamic per-128-group activations, in the attention
projections and every expert; embeddings, norms, router and lm_head stay bf16. (neuralmagic's Mixtral FP8
scales per channel; vLLM's CPU FP8 MoE kernel takes only blocks, and only on CPUs with AMX.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixtral_endpoint.model.checkpoint import MIXTRAL_FP8_QUANTIZATION_CONFIG

from .test_sizing import FP8_LINEARS

BLOCK = 128
QUANTIZATION_CONFIG = {**MIXTRAL_FP8_QUANTIZATION_CONFIG, "config_groups": {"group_0": {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                "block_structure": [BLOCK, BLOCK], "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                          "group_size": BLOCK, "dynamic": True},
}}}


def quantize_fp8(source: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, tensor in load_file(source / shard).items():
            if name.endswith(FP8_LINEARS):
                rows, cols = tensor.shape
                blocks = tensor.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
                scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
                tensors[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
                tensors[f"{name}_scale"] = scale
            else:
                tensors[name] = tensor
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION_CONFIG}))
    for path in source.iterdir():
        if path.suffix != ".safetensors" and not (out / path.name).exists():
            shutil.copy(path, out / path.name)
    return out
