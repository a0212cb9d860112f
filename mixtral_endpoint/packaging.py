"""Writes model/: an MLflow pyfunc model holding (or pointing at) a Mixtral checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow.pyfunc

from .checkpoint import inspect_checkpoint
from .errors import CheckpointError
from .pyfunc import CHECKPOINT_ARTIFACT, signature

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_REQUEST = PACKAGE_DIR.parent / "sample-request.json"


def package_model(checkpoint_dir: Path, out: Path) -> Path:
    """Saves the MLflow model to `out`, copying the checkpoint in as an artifact."""
    inspect_checkpoint(checkpoint_dir)
    if out.exists():
        shutil.rmtree(out)
    example = json.loads(SAMPLE_REQUEST.read_text())
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(PACKAGE_DIR / "model_code.py"),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
        code_paths=[str(PACKAGE_DIR), str(PACKAGE_DIR.parent / "schemas")],
        signature=signature(),
        input_example=({"input_string": example["input_data"]["input_string"]}, example["parameters"]),
        pip_requirements=str(PACKAGE_DIR.parent / "requirements.txt"),
    )
    return out


def find_mlmodel(root: Path) -> Path:
    """The MLflow model folder under AZUREML_MODEL_DIR: the folder itself or one folder down."""
    root = root.resolve()  # MLflow refuses model paths that pass through a symbolic link
    if (root / "MLmodel").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/MLmodel"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"no MLmodel file in {root} or the folders directly under it")
    raise CheckpointError(f"several MLflow models under {root}: {', '.join(p.name for p in found)}")
