"""Checkpoint checks and the preflight fit check, on copies of the tiny checkpoint broken on purpose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixtral_endpoint.checkpoint import MIXTRAL_8X7B_CONFIG, inspect_checkpoint
from mixtral_endpoint.errors import CheckpointError, DoesNotFit
from mixtral_endpoint.placement import GIB, Devices, plan
from mixtral_endpoint.stepper import Stepper
from mixtral_endpoint.tiny import build_tiny, tiny_config


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
