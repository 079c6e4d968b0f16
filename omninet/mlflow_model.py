"""A trial-model folder as an MLflow ``pyfunc`` model, optionally in the Model Registry.

    uri = log_mlflow_model(run_id, model_dir, tracking_uri="sqlite:///mlflow.db", register_as="quickstart.cpu")
    mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"input_ids": [[2, 10, 17, 5]]}))
    #   -> DataFrame: prediction (int), probabilities (list of floats), one row per input

The MLflow model holds the folder (safetensors weights, config, trial config, identity) as
its artifact and this module's ``OmniNetPyfunc``, logged as *models from code*
(``mlflow_pyfunc_entry.py``): nothing is pickled, neither a torch module nor the wrapper.
``load_context`` reads the weights with ``load_trial_model``. Input: a DataFrame with an
``input_ids`` column (lists of ints) or a ``text`` column (strings, the task's tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from omninet.artifacts import load_trial_model

__all__ = ["OmniNetPyfunc", "log_mlflow_model", "registry_name"]

ENTRY = Path(__file__).with_name("mlflow_pyfunc_entry.py")


def registry_name(sweep: str, pool: str) -> str:
    """The registered-model name of a sweep's pool: ``<sweep>.<pool>``."""
    return f"{sweep}.{pool}"


class OmniNetPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the trained trial model from the ``model_dir`` artifact; predicts classes and probabilities."""

    def load_context(self, context) -> None:
        self.trained = load_trial_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        if "input_ids" in model_input.columns:
            sequences = [[int(x) for x in ids] for ids in model_input["input_ids"]]
        elif "text" in model_input.columns:
            sequences = [self.trained.task.encode(t) for t in model_input["text"]]
        else:
            raise ValueError("model input needs an 'input_ids' or a 'text' column")
        limit, vocab = self.trained.max_length, self.trained.vocab_size
        for i, ids in enumerate(sequences):
            if not ids or len(ids) > limit or not all(0 <= x < vocab for x in ids):
                raise ValueError(f"input {i}: needs 1..{limit} token ids in [0, {vocab})")
        out = self.trained.predict_ids(sequences)
        return pd.DataFrame({"prediction": out["predictions"], "probabilities": out["probabilities"]})


def _signature_and_example(model_dir: Path):
    trained = load_trial_model(model_dir)
    split = trained.task.split("eval")
    example = pd.DataFrame({"input_ids": [split[i]["input_ids"].tolist() for i in range(min(2, len(split)))]})
    signature = ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.long), "input_ids")]),
        outputs=Schema([ColSpec(DataType.long, "prediction"), ColSpec(Array(DataType.double), "probabilities")]),
    )
    return signature, example, trained.identity


def log_mlflow_model(run_id: str, model_dir, *, tracking_uri: str | None = None, register_as: str | None = None,
                     name: str = "model") -> str:
    """Logs ``model_dir`` (a ``save_trial_model`` folder) to run ``run_id`` as a pyfunc model
    with a signature and an input example; registers it as ``register_as`` when given
    (``registry_name(sweep, pool)``). Returns the model URI."""
    model_dir = Path(model_dir)
    signature, example, identity = _signature_and_example(model_dir)
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(ENTRY), artifacts={"model_dir": str(model_dir)},
            signature=signature, input_example=example, registered_model_name=register_as,
            # Given, not inferred: inference would load the model again in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pandas", "omninet"],
            metadata={"omninet_identity": identity},
        )
    return info.model_uri
