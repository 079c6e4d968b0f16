"""MLflow models-from-code entry point for ``omninet.mlflow_model`` (nothing pickled)."""

import mlflow.models

from omninet.mlflow_model import OmniNetPyfunc

mlflow.models.set_model(OmniNetPyfunc())
