"""The MLflow door: a pyfunc model around the same Scorer that /score uses.

Saved as "models from code" (`model_code.py`), so `model/` holds no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import CheckpointError, InvalidRequest, as_scoring_error
from mixtral_endpoint.protocol.parameters import PARAMETERS, Parameter
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"  # the checkpoint folder, copied into the model
REFERENCE_ARTIFACT = "checkpoint_reference"  # a JSON file naming the checkpoint folder elsewhere
# The model_config key through which a door hands its ServerConfig (as a dict) to load_context.
# Saved as None: MLflow lets a loader override only the keys a model was saved with.
SERVER_CONFIG = "server_config"
_MLFLOW_CODES = {400: INVALID_PARAMETER_VALUE, 413: INVALID_PARAMETER_VALUE, 429: REQUEST_LIMIT_EXCEEDED,
                 503: TEMPORARILY_UNAVAILABLE}
_MLFLOW_TYPES = {"number": "double", "integer": "long", "boolean": "boolean", "string": "string"}


class MixtralModel(mlflow.pyfunc.PythonModel):
    scorer: Scorer

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        given = (context.model_config or {}).get(SERVER_CONFIG)
        # score.py and batch_score.py hand their settings in (load_scorer). MLflow's own tools
        # (load_model, models serve, spark_udf) start here: for them, this is init().
        config = ServerConfig(**given) if given is not None else ServerConfig.from_env(os.environ)
        self.scorer = Scorer.load(checkpoint_dir(context.artifacts), config)

    # No type hints on model_input: MLflow would read them as a second, type-hint signature.
    def predict(self, context, model_input, params=None):
        """One result per input row, in order, rendered as /score renders it.

        The `input_data` object of a request is one row, so `predict(input_data, params)[0]` is
        /score's answer. In a DataFrame, a row holding one text prompt gets that prompt's row
        (`{"0": ..., "finish_reason", "usage"}`; with n > 1, the list of its n rows), and a row holding a
        conversation its chat response.
        """
        # MLflow fills in every parameter the signature lists; None is "not given" (max_new_tokens's
        # default is the server's, so the signature leaves it None).
        parameters = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            items = input_items(model_input)
            results = score_api.score_all(self.scorer, [
                {"input_data": {"input_string": [item] if isinstance(item, str) else item}, "parameters": parameters}
                for item in items])
            return [result[0] if isinstance(item, str) and len(result) == 1 else result
                    for item, result in zip(items, results, strict=True)]
        except Exception as exc:
            # MLflow's scoring server turns an MlflowException into its status and a JSON message
            # (anything else into a 500 that carries the traceback).
            error = as_scoring_error(exc, log)
            raise MlflowException(error.message, error_code=_MLFLOW_CODES.get(error.status, INTERNAL_ERROR)) from None


def checkpoint_dir(artifacts: dict[str, str]) -> Path:
    if CHECKPOINT_ARTIFACT in artifacts:
        return Path(artifacts[CHECKPOINT_ARTIFACT])
    return Path(json.loads(Path(artifacts[REFERENCE_ARTIFACT]).read_text())["path"])


def load_scorer(model_dir: Path, config: ServerConfig) -> Scorer:
    """Loads model/ through MLflow, as every door does, with the door's settings; returns its Scorer."""
    path = find_mlmodel(model_dir)
    packaged = mlflow.models.Model.load(str(path))
    if SERVER_CONFIG not in packaged.flavors["python_function"].get("config", {}):
        # MLflow would drop the settings with a warning, and load_context read the environment again.
        raise CheckpointError(f"{path} was packaged by an older mixtral-endpoint that cannot take its settings "
                              "from the entry script; package it again (make clean model)")
    theirs = [spec.name for spec in packaged.signature.params.params] if packaged.signature.params else []
    if theirs != [spec.name for spec in signature().params.params]:
        # Its code (model_code.py) may name modules that have moved, and its signature would refuse or drop
        # the parameters added since.
        raise CheckpointError(f"{path} was packaged by another version of mixtral-endpoint (its parameters differ "
                              "from this one's); package it again (make clean model, or mixtral-endpoint package)")
    model = mlflow.pyfunc.load_model(str(path), model_config={SERVER_CONFIG: dataclasses.asdict(config)})
    return model.unwrap_python_model().scorer


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
        if isinstance(column, str):
            column = [column]  # one text prompt
        elif not isinstance(column, list):
            raise InvalidRequest(f"input_string must be a conversation, a list of text prompts or one prompt, "
                                 f"not {type(column).__name__}", param="input_string")
    else:
        raise InvalidRequest("the input must be {'input_string': ...} or a DataFrame with an input_string column",
                             param="input_string")
    if column and all(isinstance(v, dict) for v in column):
        return [column]  # the messages of one conversation
    return [list(v) if isinstance(v, np.ndarray) else v for v in column]


def signature() -> mlflow.models.ModelSignature:
    """Inputs of any shape in `input_string`; every request parameter, from the one table."""
    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "input_string")]),
        params=ParamSchema([_param_spec(p) for p in PARAMETERS if p.mlflow]),
    )


def _param_spec(parameter: Parameter) -> ParamSpec:
    if parameter.type == "array":  # of token ids: MLflow's array params need a list default
        return ParamSpec(parameter.name, "long", list(parameter.default), (-1,))
    if parameter.shape is not None:
        # An object (response_format): its properties as MLflow's, whatever lies deeper (a schema) as Any.
        properties = [Property(name, _mlflow_type(schema), required=name in parameter.shape.get("required", ()))
                      for name, schema in parameter.shape["properties"].items()]
        return ParamSpec(parameter.name, Object(properties), parameter.default)
    if parameter.max_items is not None:
        # A string or a list of strings: MLflow's array params take a list, and need a list default.
        return ParamSpec(parameter.name, "string", list(parameter.default), (-1,))
    # A default the server decides stays unset here, or MLflow would send it with every predict.
    default = None if parameter.server_decides_default else parameter.default
    return ParamSpec(parameter.name, _MLFLOW_TYPES[parameter.type], default)


def _mlflow_type(schema: dict[str, Any]) -> Any:
    if schema.get("type") == "array":
        return Array(_mlflow_type(schema["items"]))
    if schema.get("type") == "string" or "enum" in schema:
        return "string"
    return AnyType()
