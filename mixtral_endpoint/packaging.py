"""Writes model/: an MLflow pyfunc model holding (or pointing at) a Mixtral checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow.pyfunc

from .checkpoint import inspect_checkpoint
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

