"""`mixtral-endpoint package`: a checkpoint directory becomes the MLflow model, by copy or by reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow.pyfunc
import pytest
import yaml

from mixtral_endpoint.cli import main

from .test_checkpoint import small_fp8
from .test_sizing import MIXTRAL_FP8_BYTES, MIXTRAL_FP8_CONFIG, fp8_tensors, write_header_only_checkpoint

BIN = Path(sys.executable).parent
PROMPT = {"input_string": ["Once upon a time"]}


@pytest.fixture
def broken(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_package_by_reference_holds_no_weights_and_answers_like_the_copy(tiny_checkpoint: Path, tmp_path: Path,
                                                                          mlflow_model: Path):
    out = tmp_path / "by-reference"
    done = subprocess.run([str(BIN / "mixtral-endpoint"), "package", "--checkpoint", str(tiny_checkpoint),
                           "--out", str(out), "--reference"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(out.rglob("*.safetensors"))
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 1_000_000
    pointer = next(out.rglob("checkpoint-reference.json"))
    assert json.loads(pointer.read_text())["path"] == str(tiny_checkpoint.resolve())
    params = {"max_new_tokens": 5}
    by_reference = mlflow.pyfunc.load_model(str(out)).predict(PROMPT, params=params)
    by_copy = mlflow.pyfunc.load_model(str(mlflow_model)).predict(PROMPT, params=params)
    assert by_reference == by_copy


def test_package_by_copy_is_self_contained(mlflow_model: Path, tiny_checkpoint: Path):
    copied = sorted(p.name for p in mlflow_model.rglob("*.safetensors"))
    assert copied == sorted(p.name for p in tiny_checkpoint.glob("*.safetensors"))


def break_shard(path: Path) -> None:
    (path / "model-00002-of-00003.safetensors").unlink()


def break_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))


def pickle_only(path: Path) -> None:
    for shard in path.glob("*.safetensors"):
        shard.unlink()
    (path / "model.safetensors.index.json").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04")


def no_tokenizer(path: Path) -> None:
    (path / "tokenizer.model").unlink()


def broken_index(path: Path) -> None:
    (path / "model.safetensors.index.json").write_text("{not json")


@pytest.mark.parametrize(("damage", "named"), [
    (break_shard, "model-00002-of-00003.safetensors"),
    (break_config, "config.json"),
    (pickle_only, "pytorch_model.bin"),
    (no_tokenizer, "tokenizer.model"),
    (broken_index, "model.safetensors.index.json"),
])
def test_a_broken_checkpoint_is_refused_naming_the_file(broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        damage: Callable[[Path], None], named: str):
    damage(broken)
    out = tmp_path / "model"
    assert main(["package", "--checkpoint", str(broken), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and named in error
    assert not out.exists()


def test_an_fp8_mixtral_of_the_real_config_is_packaged_by_reference(tmp_path: Path, capsys: pytest.CaptureFixture):
    """The 47 GB FP8 checkpoint (header-only here) is accepted as it is, and MLmodel names its quantization."""
    fp8 = write_header_only_checkpoint(tmp_path / "Mixtral-8x7B-FP8", MIXTRAL_FP8_CONFIG, shards=10,
                                       tensors=fp8_tensors(MIXTRAL_FP8_CONFIG))
    assert sum(p.stat().st_size for p in fp8.glob("*.safetensors")) > MIXTRAL_FP8_BYTES  # data + headers
    out = tmp_path / "model"
    assert main(["package", "--checkpoint", str(fp8), "--out", str(out), "--reference"]) == 0, capsys.readouterr()
    assert yaml.safe_load((out / "MLmodel").read_text())["metadata"] == {"quantization": "compressed-tensors"}
    assert json.loads(next(out.rglob("checkpoint-reference.json")).read_text())["path"] == str(fp8.resolve())


def test_an_fp8_checkpoint_is_packaged_by_copy_with_its_scales(tmp_path: Path):
    fp8 = small_fp8(tmp_path / "fp8")
    out = tmp_path / "model"
    assert main(["package", "--checkpoint", str(fp8), "--out", str(out)]) == 0
    copied = next(out.rglob("config.json"))
    assert json.loads(copied.read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    names = sorted(p.name for p in fp8.glob("*.safetensors"))
    assert sorted(p.name for p in copied.parent.glob("*.safetensors")) == names


def test_an_unquantized_model_names_no_quantization(mlflow_model: Path):
    assert "quantization" not in (yaml.safe_load((mlflow_model / "MLmodel").read_text()).get("metadata") or {})
