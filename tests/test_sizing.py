"""Sizing at real scale: a checkpoint with Mixtral-8x7B's real config and safetensors headers of the
real shapes (sparse files: the headers are written, not 93 GB of data), planned against the SKUs."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.utils import convert_file_size_to_int

from mixtral_endpoint.checkpoint import MIXTRAL_8X7B_CONFIG, inspect_checkpoint
from mixtral_endpoint.placement import GIB, Devices, kv_cache_bytes, plan
from mixtral_endpoint.tokenizer import reference_tokenizer_file

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MIXTRAL_PARAMETERS = 46_702_792_704  # mistralai/Mixtral-8x7B-v0.1
# GPUs per instance and memory per GPU of the SKUs the deployment files may name.
SKUS = {"Standard_NC24ads_A100_v4": (1, 80 * GIB), "Standard_NC48ads_A100_v4": (2, 80 * GIB),
        "Standard_NC96ads_A100_v4": (4, 80 * GIB), "Standard_ND96asr_v4": (8, 40 * GIB)}


def mixtral_tensors(c: dict) -> dict[str, list[int]]:
    """Every tensor of a Hugging Face Mixtral checkpoint, by its name in the shards, with its shape."""
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": [c["vocab_size"], h], "model.norm.weight": [h],
               "lm_head.weight": [c["vocab_size"], h]}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors |= {f"{p}.self_attn.q_proj.weight": [h, h], f"{p}.self_attn.k_proj.weight": [kv, h],
                    f"{p}.self_attn.v_proj.weight": [kv, h], f"{p}.self_attn.o_proj.weight": [h, h],
                    f"{p}.block_sparse_moe.gate.weight": [c["num_local_experts"], h],
                    f"{p}.input_layernorm.weight": [h], f"{p}.post_attention_layernorm.weight": [h]}
        for e in range(c["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors |= {f"{q}.w1.weight": [i, h], f"{q}.w2.weight": [h, i], f"{q}.w3.weight": [i, h]}
    return tensors


def write_header_only_checkpoint(out: Path, config: dict, shards: int = 19) -> Path:
    out.mkdir(parents=True)
    tensors = list(mixtral_tensors(config).items())
    weight_map = {}
    per_shard = -(-len(tensors) // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tensor, shape in tensors[s * per_shard:(s + 1) * per_shard]:
            nbytes = 2 * math.prod(shape)
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        with (out / name).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the data takes no disk
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.model").write_bytes(reference_tokenizer_file().read_bytes())
    return out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_header_only_checkpoint(tmp_path_factory.mktemp("mixtral") / "Mixtral-8x7B", MIXTRAL_8X7B_CONFIG)


def test_sizes_come_from_headers_without_reading_weights(mixtral: Path):
    checkpoint = inspect_checkpoint(mixtral)
    assert checkpoint.parameters == MIXTRAL_PARAMETERS
    assert checkpoint.bytes_by_dtype == {"BF16": 2 * MIXTRAL_PARAMETERS}
    assert sum(os.stat(s).st_blocks for s in checkpoint.shards) * 512 < 10_000_000  # sparse: nothing was read


def test_kv_cache_of_mixtral_is_128_kib_per_token():
    assert kv_cache_bytes(MIXTRAL_8X7B_CONFIG, rows=1, tokens=1, dtype_bytes=2) == 128 * 1024


@pytest.mark.parametrize(("sku", "fits"), [("Standard_NC24ads_A100_v4", False), ("Standard_NC48ads_A100_v4", True),
                                           ("Standard_NC96ads_A100_v4", True), ("Standard_ND96asr_v4", True)])
def test_plan_against_the_gpu_skus(mixtral: Path, sku: str, fits: bool):
    gpus, memory = SKUS[sku]
    result = plan(inspect_checkpoint(mixtral), Devices((memory,) * gpus, 0), dtype="bfloat16", rows=8, tokens=32768)
    assert result.fits is fits, result.verdict
    if fits:
        assert not result.offloaded
        used = set(result.device_map.values())
        assert used <= set(range(gpus)) and len(used) >= min(gpus, 2)  # spread over the GPUs, nothing offloaded
    else:
        assert "does not fit" in result.verdict and "87.0 GiB" in result.verdict


def test_cpu_offload_makes_one_gpu_fit_with_modules_offloaded(mixtral: Path):
    result = plan(inspect_checkpoint(mixtral), Devices((80 * GIB,), cpu_bytes=200 * GIB), dtype="bfloat16", rows=8,
                  tokens=32768)
    assert result.fits and result.offloaded and "offloaded (slower)" in result.verdict


def test_the_deployment_files_sku_fits_the_configured_batch(mixtral: Path):
    deployment = yaml.safe_load((ROOT / "deployment.yml").read_text())
    env = deployment["environment_variables"]
    gpus, memory = SKUS[deployment["instance_type"]]
    memory = min(memory, convert_file_size_to_int(env["MIXTRAL_MAX_GPU_MEMORY"]))  # the server's own cap
    result = plan(inspect_checkpoint(mixtral), Devices((memory,) * gpus, 0), dtype="bfloat16",
                  rows=int(env["MIXTRAL_MAX_BATCH_SIZE"]), tokens=32768)
    assert result.fits and not result.offloaded, result.verdict


def test_plan_command_prints_the_placement_and_exits_by_verdict(mixtral: Path):
    fits = subprocess.run([str(BIN / "mixtral-endpoint"), "plan", "--checkpoint", str(mixtral), "--gpus", "2",
                           "--gpu-memory", "80GiB"], capture_output=True, text=True)
    assert fits.returncode == 0, fits.stderr
    assert "46.70 B parameters" in fits.stdout and "BF16 87.0 GiB" in fits.stdout
    assert "-> GPU 1" in fits.stdout and "offloaded:   nothing" in fits.stdout and "verdict:     fits" in fits.stdout
    too_small = subprocess.run([str(BIN / "mixtral-endpoint"), "plan", "--checkpoint", str(mixtral), "--gpus", "1",
                                "--gpu-memory", "80GiB"], capture_output=True, text=True)
    assert too_small.returncode == 1 and "does not fit" in too_small.stdout
