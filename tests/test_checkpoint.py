"""Checkpoint checks and the preflight fit check, on copies of the tiny checkpoint broken on purpose, and on
small header-only FP8 checkpoints laid out as the real FP8 Mixtral is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixtral_endpoint.engines.transformers.stepper import Stepper
from mixtral_endpoint.model.checkpoint import (
    MIXTRAL_8X7B_CONFIG,
    MIXTRAL_FP8_QUANTIZATION_CONFIG,
    inspect_checkpoint,
    require_unquantized,
)
from mixtral_endpoint.model.placement import GIB, Devices, plan
from mixtral_endpoint.model.tiny import build_tiny, tiny_config
from mixtral_endpoint.protocol.errors import CheckpointError, DoesNotFit

from .test_sizing import fp8_tensors, write_header_only_checkpoint

# Mixtral's layout at a few megabytes: every tensor the real FP8 checkpoint has, small.
SMALL = {**MIXTRAL_8X7B_CONFIG, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1}


@pytest.fixture
def copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_tiny_checkpoint_has_mixtrals_architecture(checkpoint):
    config = checkpoint.config
    for key in ("num_local_experts", "num_experts_per_tok", "vocab_size", "max_position_embeddings",
                "sliding_window", "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id"):
        assert config[key] == MIXTRAL_8X7B_CONFIG[key], key
    assert config["architectures"] == ["MixtralForCausalLM"]
    # Grouped-query attention with Mixtral's 4 query heads per key/value head.
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 4
    assert len(checkpoint.shards) >= 3
    assert checkpoint.parameters < 50_000_000


def test_tiny_build_is_deterministic(tiny_checkpoint: Path, tmp_path: Path):
    again = build_tiny(tmp_path / "again")
    for shard in sorted(tiny_checkpoint.glob("*.safetensors")):
        assert (again / shard.name).read_bytes() == shard.read_bytes()


def test_tiny_config_matches_the_saved_config(checkpoint):
    assert tiny_config().hidden_size == checkpoint.config["hidden_size"]


def test_parameters_are_counted_from_headers(checkpoint):
    assert checkpoint.stored_bytes == checkpoint.parameters * 2  # stored as bfloat16
    assert checkpoint.bytes_as("float32") == checkpoint.parameters * 4


def test_missing_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nowhere")


def test_missing_shard_is_named(copy: Path):
    (copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        inspect_checkpoint(copy)


def test_truncated_shard_is_named(copy: Path):
    shard = copy / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors is truncated"):
        inspect_checkpoint(copy)


def test_config_that_is_not_mixtral(copy: Path):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="config.json.*not 'mixtral'"):
        inspect_checkpoint(copy)


def test_missing_tokenizer(copy: Path):
    (copy / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model is missing"):
        inspect_checkpoint(copy)


def test_pickle_weights_are_refused(copy: Path):
    (copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        inspect_checkpoint(copy)


def test_index_without_weight_map(copy: Path):
    (copy / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        inspect_checkpoint(copy)


def test_preflight_refuses_weights_that_do_not_fit_before_reading_any(checkpoint):
    needed = checkpoint.bytes_as("float32")
    too_small = plan(checkpoint, Devices((), cpu_bytes=needed), dtype="float32", rows=1, tokens=1024)
    assert not too_small.fits
    assert too_small.verdict.startswith("does not fit: 39.8 MiB of float32 weights")
    with pytest.raises(DoesNotFit, match="does not fit"):
        Stepper.load(checkpoint, too_small)
    assert plan(checkpoint, Devices((), cpu_bytes=GIB), dtype="float32", rows=8, tokens=8192).fits


def small_fp8(out: Path, *, config: dict | None = None, drop: str = "", dtype: str = "") -> Path:
    """A header-only FP8 checkpoint of SMALL; `drop` leaves out one tensor, `dtype` renames the F8 dtype."""
    tensors = fp8_tensors(SMALL)
    tensors.pop(drop, None)
    if dtype:
        tensors = {n: (dtype if d == "F8_E4M3" else d, s) for n, (d, s) in tensors.items()}
    return write_header_only_checkpoint(out, {**SMALL, "quantization_config": MIXTRAL_FP8_QUANTIZATION_CONFIG}
                                        if config is None else config, shards=3, tensors=tensors)


def test_the_tiny_checkpoint_is_not_quantized(checkpoint):
    assert checkpoint.quantization is None
    require_unquantized(checkpoint, "transformers")


def test_an_fp8_checkpoint_is_read_with_its_quantization(tmp_path: Path):
    fp8 = inspect_checkpoint(small_fp8(tmp_path / "fp8"))
    assert fp8.quantization == "compressed-tensors"
    assert fp8.bytes_by_dtype["F8_E4M3"] == fp8.stored_bytes - fp8.bytes_by_dtype["BF16"] - fp8.bytes_by_dtype["F32"]
    with pytest.raises(CheckpointError, match="fp8.* is quantized .*the transformers engine"):
        require_unquantized(fp8, "transformers")


def test_fp8_weights_without_a_quantization_config_are_refused_naming_the_tensor(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.self_attn.q_proj.weight is F8_E4M3, but "
                                              r".*config.json has no quantization_config"):
        inspect_checkpoint(small_fp8(tmp_path / "fp8", config=SMALL))


def test_an_fp8_weight_without_its_scale_is_refused_naming_both(tmp_path: Path):
    scale = "model.layers.1.block_sparse_moe.experts.3.w2.weight_scale"
    with pytest.raises(CheckpointError, match=f"w2.weight is F8_E4M3 without its {scale}"):
        inspect_checkpoint(small_fp8(tmp_path / "fp8", drop=scale))


def test_a_quantization_config_without_its_method_is_refused(tmp_path: Path):
    config = {**SMALL, "quantization_config": {k: v for k, v in MIXTRAL_FP8_QUANTIZATION_CONFIG.items()
                                               if k != "quant_method"}}
    with pytest.raises(CheckpointError, match="config.json: quantization_config has no quant_method"):
        inspect_checkpoint(small_fp8(tmp_path / "fp8", config=config))


def test_a_dtype_safetensors_does_not_name_is_refused_naming_it(tmp_path: Path):
    with pytest.raises(CheckpointError, match="has dtype F4_E2M1, which safetensors does not name"):
        inspect_checkpoint(small_fp8(tmp_path / "fp8", dtype="F4_E2M1"))
