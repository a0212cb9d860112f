"""The MLflow door: a pyfunc model around the same Scorer that /score uses.

Saved as "models from code" (`model_code.py`), so `model/` holds no pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from .config import ServerConfig
from .errors import CheckpointError, InvalidRequest
from .protocol import load_schema
from .service import Scorer

CHECKPOINT_ARTIFACT = "checkpoint"
_MLFLOW_TYPES = {"number": "double", "integer": "long", "boolean": "boolean", "string": "string"}


class MixtralModel(mlflow.pyfunc.PythonModel):
    scorer: Scorer

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.scorer = Scorer.load(Path(context.artifacts[CHECKPOINT_ARTIFACT]), ServerConfig.from_env(os.environ))

    # No type hints on model_input: MLflow would read them as a second, type-hint signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        """One result per conversation or prompt, in order, as /score would render it."""
        parameters = {k: v for k, v in (params or {}).items() if v is not None}
        if parameters.get("stream"):
            raise InvalidRequest("stream is served by the /score endpoint, not MLflow predict", param="stream")
        return [self.scorer.score({"input_data": {"input_string": item}, "parameters": parameters})
                for item in input_items(model_input)]


def load_scorer(model_dir: Path) -> Scorer:
    """Loads model/ through MLflow, as every door does, and returns its Scorer."""
    return mlflow.pyfunc.load_model(str(find_mlmodel(model_dir))).unwrap_python_model().scorer


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


def input_items(model_input: Any) -> list[Any]:
    """The `input_string` values to score, one per result.

    A dict `{"input_string": conversation}` reaches predict as a DataFrame with one message per
    row; a DataFrame built by the caller has one conversation or one prompt per row.
    """
    if isinstance(model_input, pd.DataFrame):
        if "input_string" not in model_input.columns:
            raise InvalidRequest("the input needs an 'input_string' column", param="input_string")
        column = model_input["input_string"].tolist()
    elif isinstance(model_input, dict) and "input_string" in model_input:
        column = model_input["input_string"]
    else:
        raise InvalidRequest("the input must be {'input_string': ...} or a DataFrame with an input_string column",
                             param="input_string")
    if column and all(isinstance(v, dict) for v in column):
        return [column]  # the messages of one conversation
    return [[v] if isinstance(v, str) else v for v in column]


def signature() -> mlflow.models.ModelSignature:
    """Inputs of any shape in `input_string`; every request parameter with its default."""
    specs = []
    for name, spec in load_schema("request")["$defs"]["parameters"]["properties"].items():
        if name == "stop":
            specs.append(ParamSpec("stop", "string", [], (-1,)))
            continue
        kind = spec["type"] if isinstance(spec["type"], str) else spec["type"][0]
        specs.append(ParamSpec(name, _MLFLOW_TYPES[kind], spec["default"]))
    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "input_string")]),
        params=ParamSchema(specs),
    )
