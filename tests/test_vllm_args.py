"""vLLM's engine arguments from the typed config and the sizing plan, for Mixtral's real config on the GPUs
of the SKUs (torch's device queries answer as those GPUs would: nothing is loaded), and on a CPU host."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_endpoint.engines.transformers.transformers_engine import TransformersEngine
from mixtral_endpoint.engines.vllm_engine import engine_args
from mixtral_endpoint.model import placement
from mixtral_endpoint.model.checkpoint import inspect_checkpoint
from mixtral_endpoint.model.placement import GIB, kv_cache_bytes
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import ConfigError, DoesNotFit

from .test_deployment_files import SKU_FILES, SKU_GPUS, load

A100 = 80 * GIB


def gpus(monkeypatch: pytest.MonkeyPatch, count: int, memory: int = A100) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (memory, memory))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("Props", (), {"total_memory": memory}))


def args(checkpoint: Path, **env: str) -> dict:
    config = ServerConfig.from_env({"MIXTRAL_ENGINE": "vllm", **{f"MIXTRAL_{k.upper()}": v for k, v in env.items()}})
    return engine_args(inspect_checkpoint(checkpoint), config)[0]


def test_deployment_yml_gives_vllm_a_batch_of_256_whole_contexts_over_two_a100s(mixtral: Path,
                                                                                monkeypatch: pytest.MonkeyPatch):
    gpus(monkeypatch, 2)
    env = {k.removeprefix("MIXTRAL_").lower(): v for k, v in load("deployment.yml")["environment_variables"].items()
           if k.startswith("MIXTRAL_") and k != "MIXTRAL_ENGINE"}
    got = args(mixtral, **env)
    assert got["tensor_parallel_size"] == 2 and got["max_num_seqs"] == 256
    assert got["max_model_len"] == 32768  # the whole window: the paged cache holds tokens, not rows x window
    assert got["enable_prefix_caching"] is True and got["kv_cache_dtype"] == "auto"
    assert 0.5 < got["gpu_memory_utilization"] <= 0.95 and "kv_cache_memory_bytes" not in got


def test_unset_the_batch_is_the_plans_rows_of_1024_tokens_up_to_256(mixtral: Path, mixtral_fp8: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    gpus(monkeypatch, 2)
    assert args(mixtral)["max_num_seqs"] == 256  # 2 x A100 hold about 390 such rows
    gpus(monkeypatch, 1)
    one = ServerConfig.from_env({"MIXTRAL_ENGINE": "vllm"})
    budget = placement.kv_budget(inspect_checkpoint(mixtral_fp8), placement.visible_devices(one, memory_share=0.9),
                                 dtype="bfloat16", max_seqs=10_000)
    assert 128 < args(mixtral_fp8)["max_num_seqs"] == budget.tokens // 1024 < 256  # FP8 on one A100


def test_vllm_settings_reach_its_engine_arguments(mixtral_fp8: Path, monkeypatch: pytest.MonkeyPatch):
    gpus(monkeypatch, 1)
    got = args(mixtral_fp8, gpu_memory_utilization="0.85", kv_cache_dtype="fp8", max_num_batched_tokens="8192",
               enable_prefix_caching="false", max_batch_size="64")
    assert got["gpu_memory_utilization"] == 0.85 and got["kv_cache_dtype"] == "fp8"
    assert got["max_num_batched_tokens"] == 8192 and got["enable_prefix_caching"] is False
    assert got["max_num_seqs"] == 64 and got["tensor_parallel_size"] == 1 and got["dtype"] == "bfloat16"
    assert "quantization" not in got  # vLLM reads the checkpoint's own quantization_config


def test_a_tensor_parallel_size_over_the_visible_gpus_is_a_startup_error(mixtral: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match="MIXTRAL_TENSOR_PARALLEL_SIZE is 4, but 2 GPU"):
        args(mixtral, tensor_parallel_size="4")


def test_bf16_weights_on_one_a100_leave_no_cache_and_fp8_weights_do(mixtral: Path, mixtral_fp8: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    gpus(monkeypatch, 1)
    with pytest.raises(DoesNotFit, match="leave no room for a KV cache in 1 GPU"):
        args(mixtral)
    assert args(mixtral_fp8)["max_model_len"] == 32768


def test_a_window_the_cache_cannot_hold_is_an_error_when_asked_for_and_shrinks_when_not(
        checkpoint, monkeypatch: pytest.MonkeyPatch):
    # A CPU host whose memory leaves the tiny model's weights room for 1000 tokens of cache.
    per_token = kv_cache_bytes(checkpoint.config, rows=1, tokens=1, dtype_bytes=4)
    memory = checkpoint.bytes_as("float32") + 1000 * per_token
    monkeypatch.setattr(placement.psutil, "virtual_memory", lambda: type("Memory", (), {"available": memory}))
    config = ServerConfig.from_env({"MIXTRAL_ENGINE": "vllm", "MIXTRAL_DEVICE_MAP": "cpu"})
    got, why = engine_args(checkpoint, config)
    assert got["max_model_len"] == 992 and got["kv_cache_memory_bytes"] == 992 * per_token, why
    asked = ServerConfig.from_env({"MIXTRAL_ENGINE": "vllm", "MIXTRAL_DEVICE_MAP": "cpu",
                                   "MIXTRAL_MAX_TOTAL_TOKENS": "2048"})
    with pytest.raises(ConfigError, match=r"MIXTRAL_MAX_TOTAL_TOKENS \(2048\) is over the 992 tokens"):
        engine_args(checkpoint, asked)


def test_on_cpu_the_cache_is_the_batch_of_whole_windows(checkpoint):
    unset = ServerConfig.from_env({"MIXTRAL_ENGINE": "vllm", "MIXTRAL_DEVICE_MAP": "cpu",
                                   "MIXTRAL_MAX_TOTAL_TOKENS": "512"})
    assert engine_args(checkpoint, unset)[0]["max_num_seqs"] == 8
    config = ServerConfig.from_env({"MIXTRAL_ENGINE": "vllm", "MIXTRAL_DEVICE_MAP": "cpu",
                                    "MIXTRAL_MAX_TOTAL_TOKENS": "512", "MIXTRAL_MAX_BATCH_SIZE": "4"})
    got, _ = engine_args(checkpoint, config)
    per_token = kv_cache_bytes(checkpoint.config, rows=1, tokens=1, dtype_bytes=4)
    assert got["kv_cache_memory_bytes"] == 4 * 512 * per_token and got["max_model_len"] == 512


def test_our_engine_refuses_vllm_settings_by_name(mixtral: Path):
    config = ServerConfig(engine="transformers", kv_cache_dtype="fp8", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="MIXTRAL_TENSOR_PARALLEL_SIZE, MIXTRAL_KV_CACHE_DTYPE: vLLM's settings"):
        TransformersEngine.load(inspect_checkpoint(mixtral), config)


@pytest.mark.parametrize("name", ["deployment.yml", *SKU_FILES])
def test_each_deployment_file_fills_its_gpus_with_rows_its_cache_holds(name: str, mixtral: Path, mixtral_fp8: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """vLLM starts under the file's own settings with the whole window, and its paged cache holds the file's
    batch of typical rows (1000 prompt + 500 new tokens): no place in the batch waits on a cache it lacks."""
    deployment = load(name)
    count, memory = SKU_GPUS[deployment["instance_type"]]
    # One engine replica per gunicorn worker (WORKER_COUNT), each on its own group of the SKU's GPUs.
    count //= int(deployment["environment_variables"].get("WORKER_COUNT", 1))
    gpus(monkeypatch, count, memory)
    env = {k: str(v) for k, v in deployment["environment_variables"].items() if k.startswith("MIXTRAL_")}
    checkpoint = inspect_checkpoint(mixtral_fp8 if "fp8" in deployment["model"] else mixtral)
    got, why = engine_args(checkpoint, ServerConfig.from_env(env))
    assert got["max_model_len"] == 32768 and got["tensor_parallel_size"] == count, why
    assert got["max_num_seqs"] >= 128  # the batch that fills an A100 or H100's step (issue 16)
    devices = placement.visible_devices(ServerConfig.from_env(env), memory_share=got["gpu_memory_utilization"])
    budget = placement.kv_budget(checkpoint, devices, dtype="bfloat16", row_tokens=1500, max_seqs=10_000)
    assert budget.max_seqs >= got["max_num_seqs"], (budget, why)


def test_fp8_weights_are_never_run_with_float32_activations(mixtral_fp8: Path):
    """vLLM's FP8 kernels take 16-bit activations: auto picks bfloat16 even on CPU (the FP8 serving test runs
    so), and asking for float32 is a start-up error rather than a failure at the first request."""
    with pytest.raises(ConfigError, match="MIXTRAL_DTYPE=float32, but compressed-tensors weights run with bfloat16"):
        args(mixtral_fp8, device_map="cpu", dtype="float32")
