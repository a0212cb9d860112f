"""Writes model/: an MLflow pyfunc model holding (or pointing at) a Mixtral checkpoint."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc

from mixtral_endpoint.doors.mlflow_model.pyfunc import CHECKPOINT_ARTIFACT, REFERENCE_ARTIFACT, SERVER_CONFIG, signature
from mixtral_endpoint.model.checkpoint import inspect_checkpoint

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = HERE.parents[1]  # mixtral_endpoint/, copied whole into the model as its code
SAMPLE_REQUEST = PACKAGE_DIR.parent / "sample-request.json"


def package_model(checkpoint_dir: Path, out: Path, *, reference: bool = False) -> Path:
    """Saves the MLflow model to `out`, after checking the checkpoint directory.

    By copy (the default) the checkpoint becomes an artifact inside `out`, so the folder is
    self-contained (what `az ml model create --path model` uploads). By reference `out` holds only
    the checkpoint's absolute path: no 93 GB copy, but the path must exist wherever it is served.
    A pre-quantized checkpoint (FP8) is packaged as it is; MLmodel's metadata names its quantization.
    """
    checkpoint = inspect_checkpoint(checkpoint_dir)
    if out.exists():
        shutil.rmtree(out)
    example = json.loads(SAMPLE_REQUEST.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if reference:
            pointer = Path(tmp) / "checkpoint-reference.json"
            pointer.write_text(json.dumps({"path": str(checkpoint_dir.resolve())}) + "\n")
            artifacts = {REFERENCE_ARTIFACT: str(pointer)}
        else:
            artifacts = {CHECKPOINT_ARTIFACT: str(checkpoint_dir)}
        mlflow.pyfunc.save_model(
            path=str(out),
            python_model=str(HERE / "model_code.py"),
            artifacts=artifacts,
            code_paths=[str(PACKAGE_DIR), str(PACKAGE_DIR.parent / "schemas")],
            signature=signature(),
            model_config={SERVER_CONFIG: None},  # filled in by the door that loads it (pyfunc.load_scorer)
            input_example=({"input_string": example["input_data"]["input_string"]}, example["parameters"]),
            pip_requirements=str(PACKAGE_DIR.parent / "requirements.txt"),
            metadata={"quantization": checkpoint.quantization} if checkpoint.quantization else None,
        )
    return out

