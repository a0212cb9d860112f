"""The file MLflow saves as the model's code ("models from code"): no pickle in model/."""

import mlflow.models

from mixtral_endpoint.pyfunc import MixtralModel

mlflow.models.set_model(MixtralModel())
