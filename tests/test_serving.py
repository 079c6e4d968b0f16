"""Real HTTP against a real Ray Serve deployment on 127.0.0.1 (one app for the module; every
request with a client timeout): predictions equal the model's direct outputs, bad input is a
one-line 400/413, bad requests batched with good ones leave them intact, and the served model
is the trained one (its eval accuracy over HTTP is the trial's). Plus ``omninet serve``'s
bad-input exits."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from omninet.cli import main as omninet_main
from omninet.serve import load_trial_model
from omninet.serve.testing import LISTOPS_SERVE_TRIAL, quick_trained_model

pytestmark = pytest.mark.slow  # ~60-75 s on a busy 2-core machine: training, Ray and Serve start-up
TIMEOUT = 20  # seconds, every request
TRIAL = {**LISTOPS_SERVE_TRIAL, "train": {**LISTOPS_SERVE_TRIAL["train"], "steps": 10}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return quick_trained_model(TRIAL, tmp_path_factory.mktemp("served") / "trial-000004", sweep="t", pool="cpu", trial=4)


@pytest.fixture(scope="module")
def url(model_dir):
    ray = pytest.importorskip("ray")
    from ray import serve

    from omninet.serve.app import serve_model

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # A wide batching window so that concurrent requests really share batches.
        yield serve_model(model_dir, host="127.0.0.1", port=_free_port(), max_batch_size=8, batch_wait_timeout_s=0.05,
                          max_batch_tokens=1024, num_threads=1, ray_actor_options={"num_cpus": 1})
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def trained(model_dir):
    return load_trial_model(model_dir)


def post(url: str, body) -> requests.Response:
    if isinstance(body, (dict, list)):
        return requests.post(f"{url}/predict", json=body, timeout=TIMEOUT)
    return requests.post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def direct_probs(trained, seqs: list[list[int]]) -> list[list[float]]:
    with torch.no_grad():
        return [trained.model(torch.tensor([s])).logits.softmax(-1)[0].tolist() for s in seqs]


def test_health_reports_the_model_identity(url, trained) -> None:
    r = requests.get(f"{url}/health", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": {"sweep": "t", "pool": "cpu", "trial": 4,
                                                  "config_hash": trained.identity["config_hash"]}}


def test_predictions_equal_the_models_direct_outputs(url, trained) -> None:
    eval_split = trained.task.split("eval")
    seqs = [eval_split[i]["input_ids"].tolist() for i in range(5)]
    texts = [" ".join(trained.task.decode(s)) for s in seqs]
    want = direct_probs(trained, seqs)
    for body, idx in (({"input_ids": seqs[0]}, [0]), ({"input_ids": seqs}, list(range(5))),
                      ({"text": texts[1]}, [1]), ({"text": texts}, list(range(5)))):
        r = post(url, body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"]["trial"] == 4 and out["truncated"] == [False] * len(idx)
        for probs, pred, i in zip(out["probabilities"], out["predictions"], idx):
            assert probs == pytest.approx(want[i], abs=1e-5)
            assert pred == max(range(len(probs)), key=probs.__getitem__)


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"input_ids": "2 10 5"}, 400, "list of ints"),
    ({"input_ids": [2, 10.5, 5]}, 400, "list of ints"),
    ({"input_ids": [2, True, 5]}, 400, "list of ints"),
    ({"text": 7}, 400, "string or a list of strings"),
    ({"text": "[MAX 2 banana ]"}, 400, "unknown ListOps token"),
    ({"input_ids": []}, 400, "empty"),
    ({"input_ids": [[2, 10, 5], []]}, 400, "input 1 is empty"),
    ({"text": ""}, 400, "empty"),
    ({"text": []}, 400, "empty"),
    ({}, 400, "exactly one of"),
    ({"text": "[MAX 2 ]", "input_ids": [2]}, 400, "exactly one of"),
    ({"input_ids": [2, 10, 5], "top_k": 3}, 400, "unknown field"),
    ({"input_ids": [2, 18, 5]}, 400, "outside the vocabulary [0, 18)"),
    ({"input_ids": [2, -1, 5]}, 400, "outside the vocabulary"),
    ({"input_ids": [2, 10, 5], "truncate": "yes"}, 400, "true or false"),
    ({"input_ids": [9] * 513}, 413, "at most 512"),
])
def test_bad_input_is_a_one_line_json_error(url, body, status, needle) -> None:
    r = post(url, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and needle in r.json()["error"] and "\n" not in r.json()["error"]


def test_truncation_only_when_asked(url, trained) -> None:
    long = [9] * 600
    r = post(url, {"input_ids": [long, [2, 10, 5]], "truncate": True})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [True, False]
    assert r.json()["probabilities"][0] == pytest.approx(direct_probs(trained, [long[:512]])[0], abs=1e-5)


def test_long_buckets_get_smaller_batches(url) -> None:
    stats = requests.get(f"{url}/stats", timeout=TIMEOUT).json()  # max_batch_size 8, max_batch_tokens 1024
    assert stats["max_batch_size_per_bucket"] == {"16": 8, "32": 8, "64": 8, "128": 8, "256": 4, "512": 2}


def test_wrong_route_and_method(url) -> None:
    assert requests.get(f"{url}/predict", timeout=TIMEOUT).status_code == 405
    assert requests.get(f"{url}/nope", timeout=TIMEOUT).status_code == 404


def test_bad_requests_batched_with_good_ones_leave_them_intact(url, trained) -> None:
    eval_split = trained.task.split("eval")
    good = [eval_split[i]["input_ids"].tolist()[:30] for i in range(16)]  # one bucket, so they share batches
    want = direct_probs(trained, good)
    bad = [{"input_ids": [2, 99, 5]}, {"input_ids": [9] * 600}, "{oops", {"text": "[MAX x ]"}]
    bodies = [({"input_ids": g}, i) for i, g in enumerate(good)] + [(b, None) for b in bad] * 2
    order = [bodies[i] for i in sorted(range(len(bodies)), key=lambda i: (i * 7) % len(bodies))]  # interleave
    before = requests.get(f"{url}/stats", timeout=TIMEOUT).json()["batch_sizes"]
    with ThreadPoolExecutor(len(order)) as pool:
        responses = list(pool.map(lambda b: post(url, b[0]), order))
    for (body, i), r in zip(order, responses):
        if i is None:
            assert r.status_code in (400, 413), r.text
        else:
            assert r.status_code == 200, r.text
            assert r.json()["probabilities"][0] == pytest.approx(want[i], abs=1e-5)
    after = requests.get(f"{url}/stats", timeout=TIMEOUT).json()["batch_sizes"]
    grew = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grew) > 1, f"no request shared a batch: {grew}"


def test_the_served_model_is_the_trained_one(url, trained) -> None:
    eval_split = trained.task.split("eval")
    rows = [eval_split[i] for i in range(len(eval_split))]
    correct = 0
    for start in range(0, len(rows), 50):
        chunk = rows[start:start + 50]
        r = post(url, {"input_ids": [row["input_ids"].tolist() for row in chunk]})
        assert r.status_code == 200, r.text
        correct += sum(p == int(row["labels"]) for p, row in zip(r.json()["predictions"], chunk))
    assert correct / len(rows) == pytest.approx(trained.metrics["accuracy"], abs=1.5 / len(rows))


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys) -> None:
    cases = [([str(tmp_path / "missing"), "--pool", "cpu"], "no such directory"),
             ([str(tmp_path)], "no sweep.yaml")]
    for argv, needle in cases:
        assert omninet_main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_cli_bad_pool_or_missing_model_exits_2(model_dir, tmp_path, capsys) -> None:
    from test_serve_artifacts import _write_sweep  # one pool 'cpu'; trial 1 kept its model, trial 0 did not

    _write_sweep(tmp_path / "sweep", model_dir)
    capsys.readouterr()  # Optuna's study-created notice
    cases = [([], "--pool is required"), (["--pool", "gpu"], "not in this sweep"),
             (["--pool", "cpu", "--trial", "0"], "trial 0 of pool 'cpu' kept no model"),
             (["--pool", "cpu", "--port", "0"], "--port must be in 1..65535")]
    for argv, needle in cases:
        assert omninet_main(["serve", str(tmp_path / "sweep"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_cli_writes_a_serve_config_for_a_cluster(model_dir, tmp_path) -> None:
    import yaml

    out = tmp_path / "serve.yaml"
    assert omninet_main(["serve", str(model_dir), "--write-config", str(out), "--replicas", "2", "--num-cpus", "1"]) == 0
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["import_path"] == "omninet.serve.app:app_builder"
    assert app["args"]["model_dir"] == str(model_dir.resolve()) and app["args"]["num_replicas"] == 2
    from omninet.serve.app import app_builder

    assert app_builder(app["args"]) is not None  # the builder accepts the file's args
