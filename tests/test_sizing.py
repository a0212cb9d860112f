"""Sizing at real scale: a checkpoint with Mixtral-8x7B's real config and safetensors headers of the
real shapes (sparse files: the headers are written, not 93 GB of data), planned against the SKUs; and its
FP8 copy, laid out as neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8 (compressed-tensors) is."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_endpoint.cli import main
from mixtral_endpoint.engines.transformers.transformers_engine import TransformersEngine
from mixtral_endpoint.model.checkpoint import (
    DTYPE_BYTES,
    MIXTRAL_8X7B_CONFIG,
    MIXTRAL_FP8_QUANTIZATION_CONFIG,
    inspect_checkpoint,
    require_unquantized,
)
from mixtral_endpoint.model.placement import (
    GIB,
    MAX_NUM_SEQS,
    VLLM_MEMORY_SHARE,
    Devices,
    KvBudget,
    kv_budget,
    kv_cache_bytes,
    plan,
    replica_plan,
)
from mixtral_endpoint.model.tokenizer import reference_tokenizer_file
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MIXTRAL_PARAMETERS = 46_702_792_704  # mistralai/Mixtral-8x7B-v0.1
# GPUs per instance and memory per GPU of the SKUs the deployment files may name.
SKUS = {"Standard_NC24ads_A100_v4": (1, 80 * GIB), "Standard_NC48ads_A100_v4": (2, 80 * GIB),
        "Standard_NC96ads_A100_v4": (4, 80 * GIB), "Standard_ND96asr_v4": (8, 40 * GIB),
        "Standard_NC40ads_H100_v5": (1, 94 * 10**9),  # one H100 NVL, 94 GB (taken as GB: the lower figure)
        "Standard_ND96amsr_A100_v4": (8, 80 * GIB), "Standard_ND96isr_H100_v5": (8, 80 * GIB)}
# The linear layers neuralmagic's FP8 Mixtral quantizes: attention projections and every expert's w1, w2, w3.
# Embeddings, norms, the router (block_sparse_moe.gate) and lm_head stay BF16.
FP8_LINEARS = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")
MIXTRAL_FP8_CONFIG = {**MIXTRAL_8X7B_CONFIG, "quantization_config": MIXTRAL_FP8_QUANTIZATION_CONFIG}
# Stored bytes of that FP8 copy: 45.10 GB of FP8 experts, 1.34 GB of FP8 attention, 34.9 MB of F32 scales and
# 0.53 GB of BF16 embeddings, lm_head, router and norms.
MIXTRAL_FP8_BYTES = 47_001_120_256


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


def fp8_tensors(c: dict) -> dict[str, tuple[str, list[int]]]:
    """The FP8 checkpoint's tensors: (dtype, shape), each quantized weight followed by its two scales."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name, shape in mixtral_tensors(c).items():
        if not name.endswith(FP8_LINEARS):
            tensors[name] = ("BF16", shape)
            continue
        tensors[name] = ("F8_E4M3", shape)
        tensors[f"{name}_scale"] = ("F32", [shape[0], 1])  # one per output channel
        tensors[name.removesuffix("weight") + "input_scale"] = ("F32", [1])
    return tensors


def write_header_only_checkpoint(out: Path, config: dict, shards: int = 19,
                                 tensors: dict[str, tuple[str, list[int]]] | None = None) -> Path:
    """`tensors`: name -> (safetensors dtype, shape); default, every tensor of `config` in BF16."""
    out.mkdir(parents=True)
    laid_out = list((tensors or {n: ("BF16", s) for n, s in mixtral_tensors(config).items()}).items())
    weight_map = {}
    per_shard = -(-len(laid_out) // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tensor, (dtype, shape) in laid_out[s * per_shard:(s + 1) * per_shard]:
            nbytes = DTYPE_BYTES.get(dtype, 1) * math.prod(shape)  # a dtype this package does not know: 1 byte
            header[tensor] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
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


@pytest.mark.e2e  # the command, in its own process
def test_plan_command_prints_the_placement_and_exits_by_verdict(mixtral: Path):
    fits = subprocess.run([str(BIN / "mixtral-endpoint"), "plan", "--checkpoint", str(mixtral), "--gpus", "2",
                           "--gpu-memory", "80GiB"], capture_output=True, text=True)
    assert fits.returncode == 0, fits.stderr
    assert "46.70 B parameters" in fits.stdout and "BF16 87.0 GiB" in fits.stdout
    assert "-> GPU 1" in fits.stdout and "offloaded:   nothing" in fits.stdout and "verdict:     fits" in fits.stdout
    too_small = subprocess.run([str(BIN / "mixtral-endpoint"), "plan", "--checkpoint", str(mixtral), "--gpus", "1",
                                "--gpu-memory", "80GiB"], capture_output=True, text=True)
    assert too_small.returncode == 1 and "does not fit" in too_small.stdout


def test_the_fp8_quantization_config_is_one_compressed_tensors_reads():
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(MIXTRAL_FP8_QUANTIZATION_CONFIG)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.type, weights.num_bits, weights.strategy) == ("float", 8, "channel")


def test_fp8_checkpoint_is_sized_at_its_stored_bytes_not_as_bf16(mixtral_fp8: Path):
    checkpoint = inspect_checkpoint(mixtral_fp8)
    assert checkpoint.quantization == "compressed-tensors"
    assert checkpoint.parameters == MIXTRAL_PARAMETERS  # the scales are not parameters
    assert checkpoint.stored_bytes == MIXTRAL_FP8_BYTES  # 47.0 GB, 43.8 GiB
    assert set(checkpoint.bytes_by_dtype) == {"F8_E4M3", "F32", "BF16"}
    assert checkpoint.bytes_as("bfloat16") == MIXTRAL_FP8_BYTES  # served as stored, BF16 parts kept BF16
    assert checkpoint.bytes_as("float32") == MIXTRAL_FP8_BYTES + checkpoint.bytes_by_dtype["BF16"]


def test_fp8_fits_one_a100_with_a_kv_budget_where_bf16_does_not(mixtral: Path, mixtral_fp8: Path):
    gpus = (80 * GIB,)
    fp8 = plan(inspect_checkpoint(mixtral_fp8), Devices(gpus, 0), dtype="bfloat16", rows=8, tokens=32768)
    assert fp8.fits and fp8.device_map is None, fp8.verdict  # vLLM places it: no accelerate map
    assert "compressed-tensors weights as stored" in fp8.verdict
    vllm = Devices((int(80 * GIB * VLLM_MEMORY_SHARE),), 0)
    budget = kv_budget(inspect_checkpoint(mixtral_fp8), vllm, dtype="bfloat16", row_tokens=1500)
    assert budget.tokens > 32768 and budget.max_seqs >= 64  # a whole context, and many rows of 1000 + 500
    bf16 = plan(inspect_checkpoint(mixtral), Devices(gpus, 0), dtype="bfloat16", rows=8, tokens=32768)
    assert not bf16.fits and "does not fit" in bf16.verdict
    assert kv_budget(inspect_checkpoint(mixtral), vllm, dtype="bfloat16") == KvBudget(0, 0, 0)


# Rows of 1000 prompt + 500 new tokens vLLM's cache holds (bf16 KV, 0.9 of each GPU), before max_num_seqs:
# the figures the README gives.
@pytest.mark.parametrize(("sku", "fp8", "rows"), [
    ("Standard_NC48ads_A100_v4", False, 266), ("Standard_NC96ads_A100_v4", False, 1007),
    ("Standard_NC24ads_A100_v4", True, 131), ("Standard_NC40ads_H100_v5", True, 168),
])
def test_rows_of_a_typical_length_that_each_sku_holds(mixtral: Path, mixtral_fp8: Path, sku: str, fp8: bool,
                                                       rows: int):
    gpus, memory = SKUS[sku]
    checkpoint = inspect_checkpoint(mixtral_fp8 if fp8 else mixtral)
    budget = kv_budget(checkpoint, Devices((int(memory * VLLM_MEMORY_SHARE),) * gpus, 0), dtype="bfloat16",
                       row_tokens=1500)
    assert budget.tokens // 1504 == rows  # a row holds whole 16-token blocks
    assert budget.max_seqs == min(rows, MAX_NUM_SEQS)
    assert budget.bytes == budget.tokens * 128 * 1024


def test_kv_budget_follows_the_memory_the_weights_leave(mixtral: Path):
    checkpoint = inspect_checkpoint(mixtral)
    two = kv_budget(checkpoint, Devices((72 * GIB,) * 2, 0), dtype="bfloat16")
    # Each GPU keeps 72 GiB - half the bf16 weights - 4 GiB headroom (24.5 GiB) for half of every token: 64 KiB.
    assert two.tokens == (68 * GIB - MIXTRAL_PARAMETERS) // (64 * 1024) // 16 * 16
    assert two.max_seqs == MAX_NUM_SEQS
    fp8_kv = kv_budget(checkpoint, Devices((72 * GIB,) * 2, 0), dtype="bfloat16", kv_cache_dtype="fp8")
    assert 0 <= fp8_kv.tokens - 2 * two.tokens <= 16  # fp8 halves a token: twice the tokens, to a block
    # The tightest GPU sets the budget: every GPU holds its share of every token.
    assert kv_budget(checkpoint, Devices((72 * GIB, 60 * GIB), 0), dtype="bfloat16").tokens < two.tokens
    # Past 8 GPUs (Mixtral's 8 key/value heads) the heads are replicated, not split further.
    eight = kv_budget(checkpoint, Devices((40 * GIB,) * 8, 0), dtype="bfloat16")
    sixteen = kv_budget(checkpoint, Devices((40 * GIB,) * 16, 0), dtype="bfloat16")
    one_head = 2 * 32 * 128 * 2  # k and v of one head in 32 layers, bf16: 16 KiB of every token on each GPU
    assert eight.bytes == eight.tokens * one_head * 8 and sixteen.bytes == sixteen.tokens * one_head * 16
    assert eight.tokens < sixteen.tokens < 2 * eight.tokens  # twice the GPUs, not twice the tokens
    long_rows = kv_budget(checkpoint, Devices((72 * GIB,) * 2, 0), dtype="bfloat16", row_tokens=32768)
    assert long_rows.max_seqs == two.tokens // 32768
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_budget(checkpoint, Devices((72 * GIB,) * 2, 0), dtype="bfloat16", kv_cache_dtype="int4")


def test_kv_budget_on_a_cpu_host_is_what_the_weights_leave(checkpoint):
    weights = checkpoint.bytes_as("float32")
    per_token = kv_cache_bytes(checkpoint.config, rows=1, tokens=1, dtype_bytes=4)
    budget = kv_budget(checkpoint, Devices((), cpu_bytes=weights + 1000 * per_token), dtype="float32")
    assert budget == KvBudget(992, 1, 992 * per_token)  # whole blocks; fewer than a typical row, still one
    assert kv_budget(checkpoint, Devices((), cpu_bytes=weights), dtype="float32") == KvBudget(0, 0, 0)


def test_our_engine_refuses_a_quantized_checkpoint_by_name(mixtral: Path, mixtral_fp8: Path):
    require_unquantized(inspect_checkpoint(mixtral), "transformers")
    with pytest.raises(CheckpointError, match=r"quantized \(compressed-tensors, F8_E4M3 tensors\); the transformers "
                                              r"engine serves only unquantized.*MIXTRAL_ENGINE=vllm"):
        require_unquantized(inspect_checkpoint(mixtral_fp8), "transformers")
    with pytest.raises(CheckpointError, match="the transformers engine serves only unquantized"):
        TransformersEngine.load(inspect_checkpoint(mixtral_fp8), ServerConfig(engine="transformers"))


def test_plan_command_says_how_many_rows_of_a_length_fit(mixtral: Path, mixtral_fp8: Path,
                                                        capsys: pytest.CaptureFixture):
    def run(*args: str) -> tuple[int, str]:
        status = main(["plan", *args])
        return status, capsys.readouterr().out

    status, out = run("--checkpoint", str(mixtral), "--gpus", "2", "--prompt-tokens", "1000", "--new-tokens", "500")
    assert status == 0
    assert "vLLM cache:  401,472 tokens of bfloat16 KV" in out
    assert "rows:        266 of 1000 + 500 tokens fit in the cache; max_num_seqs caps the batch at 256" in out
    status, out = run("--checkpoint", str(mixtral_fp8), "--gpus", "1", "--prompt-tokens", "1000", "--new-tokens",
                      "500", "--kv-cache-dtype", "fp8")
    assert status == 0
    assert "F8_E4M3 43.2 GiB" in out and "compressed-tensors" in out
    assert "tokens of fp8 KV (64.0 KiB each)" in out and "rows:        263 of 1000 + 500" in out
    status, out = run("--checkpoint", str(mixtral), "--gpus", "1", "--prompt-tokens", "1000", "--new-tokens", "500")
    assert status == 1 and "rows:        none" in out


@pytest.mark.parametrize(("sku", "fp8", "replicas", "tensor_parallel"), [
    ("Standard_ND96amsr_A100_v4", False, 4, 2), ("Standard_ND96isr_H100_v5", False, 4, 2),
    ("Standard_ND96amsr_A100_v4", True, 8, 1), ("Standard_NC96ads_A100_v4", False, 2, 2),
    ("Standard_ND96asr_v4", False, 2, 4),
])
def test_replicas_take_the_fewest_gpus_that_hold_the_weights_and_a_whole_window(
        mixtral: Path, mixtral_fp8: Path, sku: str, fp8: bool, replicas: int, tensor_parallel: int):
    gpus, memory = SKUS[sku]
    checkpoint = inspect_checkpoint(mixtral_fp8 if fp8 else mixtral)
    result = replica_plan(checkpoint, gpus=gpus, gpu_bytes=memory, dtype="bfloat16")
    assert (result.replicas, result.tensor_parallel) == (replicas, tensor_parallel), result.refused
    assert result.budget.tokens >= checkpoint.context_window
    assert len(result.refused) == tensor_parallel.bit_length() - 1  # every smaller group, with its reason


def test_plan_command_prints_the_replicas_and_the_settings_that_deploy_them(mixtral: Path, mixtral_fp8: Path,
                                                                         capsys: pytest.CaptureFixture):
    assert main(["plan", "--checkpoint", str(mixtral), "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert ("replicas:    1 GPU(s) per replica would not do: 87.0 GiB of weights on each GPU, of the 68.0 GiB vLLM "
            "may use there after 4.0 GiB headroom, do not fit") in out
    assert ("replicas:    4 x tensor parallel 2 on 8 GPU(s): each GPU holds 43.5 GiB of weights; each replica's "
            "cache 401,472 tokens (49.0 GiB), 392 rows of 1024 tokens, max_num_seqs 256") in out
    assert ('deploy:      WORKER_COUNT=4 MIXTRAL_TENSOR_PARALLEL_SIZE=2 MIXTRAL_MAX_BATCH_SIZE=256 '
            'GUNICORN_CMD_ARGS="--threads 272 --worker-connections 272 '
            '--worker-class mixtral_endpoint.serving.replicas.ReplicaWorker"') in out
    assert main(["plan", "--checkpoint", str(mixtral_fp8), "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "replicas:    8 x tensor parallel 1 on 8 GPU(s): each GPU holds 43.8 GiB of weights" in out
    assert "deploy:      WORKER_COUNT=8 MIXTRAL_TENSOR_PARALLEL_SIZE=1" in out
