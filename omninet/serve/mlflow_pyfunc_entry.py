"""MLflow models-from-code entry point for ``omninet.serve.mlflow_model`` (nothing pickled)."""

import mlflow.models

from omninet.serve.mlflow_model import OmniNetPyfunc

mlflow.models.set_model(OmniNetPyfunc())
