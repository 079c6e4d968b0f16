"""platform/: the cluster definitions are valid and offer the resources the shipped sweeps
request (no cloud needed: Ray's own cluster-config schema, YAML structure, shell syntax)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"


def _pool_accelerators() -> set[str]:
    full = yaml.safe_load((ROOT / "sweeps" / "full.yaml").read_text())
    return {k for p in full["pools"] for k in p["resources"] if k != "CPU"}


def test_platform_is_a_plain_folder() -> None:
    assert not (PLATFORM / "__init__.py").exists()


def test_cluster_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((PLATFORM / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on a schema violation
    offered = {k for t in raw["available_node_types"].values() for k in t["resources"]}
    assert {"GPU", "TPU"} <= offered and "CPU" in offered
    # NPU hosts join by `ray start --resources`, documented in the file
    assert '--resources=\'{"NPU": 8}\'' in (PLATFORM / "ray-cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])


def test_kuberay_manifest_offers_every_pool_resource() -> None:
    docs = list(yaml.safe_load_all((PLATFORM / "kuberay-raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    offered = set()
    for group in cluster["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        if "num-gpus" in params:
            offered.add("GPU")
        if "resources" in params:
            offered |= set(json.loads(json.loads(params["resources"])))
        assert group["minReplicas"] <= group["maxReplicas"]
    assert _pool_accelerators() <= offered == {"GPU", "TPU", "NPU"}
    assert {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]} == {"cpu", "gpu", "tpu", "npu"}
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_local_cluster_script_is_valid_bash_and_binds_localhost() -> None:
    script = PLATFORM / "start_local_cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "HOST=127.0.0.1" in text and "--dashboard-host=\"$HOST\"" in text
    for kind in ("--num-gpus=1", '{"TPU": 1}', '{"NPU": 1}'):
        assert kind in text


def test_platform_points_at_shared_postgres_and_mlflow_server() -> None:
    """Both cluster definitions name a PostgreSQL store and an MLflow tracking server, with the
    driver library installed, and the storage section they document parses."""
    import re

    from omninet.sweep.config import StorageSpec

    docs = list(yaml.safe_load_all((PLATFORM / "kuberay-raycluster.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Service", "omninet-postgres"), ("Service", "omninet-mlflow"), ("StatefulSet", "omninet-postgres"),
            ("Deployment", "omninet-mlflow")} <= kinds
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "omninet-mlflow")
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri postgresql+psycopg2://" in args and "--artifacts-destination" in args
    launcher = (PLATFORM / "ray-cluster.yaml").read_text()
    raw = yaml.safe_load(launcher)
    assert "psycopg2-binary" in " ".join(raw["setup_commands"])
    assert "mlflow server --backend-store-uri postgresql" in " ".join(raw["head_start_ray_commands"])
    for text in (launcher, (PLATFORM / "kuberay-raycluster.yaml").read_text()):
        urls = dict(re.findall(r"#\s+(optuna_url|mlflow_uri): (\S+)", text))
        spec = StorageSpec.from_dict(urls)
        assert spec.optuna_url.startswith("postgresql://") and spec.mlflow_uri.startswith("http://")
