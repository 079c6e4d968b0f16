"""A trial model logged to MLflow as a pyfunc model (local sqlite store in tmp_path): it
loads back through the safetensors weights with nothing pickled, predicts what the model
does, and registers as <sweep>.<pool>."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omninet.serve import load_trial_model
from omninet.serve.testing import LISTOPS_SERVE_TRIAL, quick_trained_model

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow  # ~20 s: training a few steps, logging and loading the MLflow model twice
TRIAL = {**LISTOPS_SERVE_TRIAL, "train": {**LISTOPS_SERVE_TRIAL["train"], "steps": 5}}


def test_pyfunc_predicts_the_models_outputs_and_registers(tmp_path) -> None:
    import pandas as pd
    from mlflow import MlflowClient

    from omninet.mlflow_model import log_mlflow_model, registry_name

    model_dir = quick_trained_model(TRIAL, tmp_path / "model", sweep="s", pool="cpu", trial=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="trial 2").info.run_id
    client.set_terminated(run_id)  # the controller's trial runs are finished before their model is logged
    model_uri = log_mlflow_model(run_id, model_dir, tracking_uri=uri, register_as=registry_name("s", "cpu"))

    trained = load_trial_model(model_dir)
    split = trained.task.split("eval")
    seqs = [split[i]["input_ids"].tolist() for i in range(4)]
    with torch.no_grad():
        want = [trained.model(torch.tensor([s])).logits.softmax(-1)[0].tolist() for s in seqs]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for loaded_uri in (model_uri, "models:/s.cpu/1"):
        model = mlflow.pyfunc.load_model(loaded_uri)
        out = model.predict(pd.DataFrame({"input_ids": seqs}))
        assert list(out.columns) == ["prediction", "probabilities"]
        for probs, pred, w in zip(out["probabilities"], out["prediction"], want):
            assert list(probs) == pytest.approx(w, abs=1e-5)
            assert pred == max(range(len(w)), key=w.__getitem__)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.input_names() == ["input_ids"] and info.saved_input_example_info is not None
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]
    assert list(local.rglob("model.safetensors"))
    assert client.get_registered_model("s.cpu").name == "s.cpu"


def test_models_logged_before_the_move_still_load() -> None:
    """Their copied entry file imports ``OmniNetPyfunc`` from the old path."""
    import omninet.mlflow_model
    import omninet.serve.mlflow_model

    assert omninet.serve.mlflow_model.OmniNetPyfunc is omninet.mlflow_model.OmniNetPyfunc
