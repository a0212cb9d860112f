"""The file MLflow saves as the model's code ("models from code"): no pickle in model/."""

import mlflow.models

from mixtral_endpoint.doors.mlflow_model.pyfunc import MixtralModel

mlflow.models.set_model(MixtralModel())
