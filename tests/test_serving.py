"""Real HTTP against a real Ray Serve deployment on 127.0.0.1 (one app for the module; every
request with a client timeout): predictions equal the model's direct outputs, bad input is a
one-line 400/413 that quotes at most ~80 characters of it, a body past ``max_body_bytes`` is a
413 before it is read (Content-Length) or as soon as it passes the limit (chunked), bad requests
batched with good ones leave them intact, and the served model is the trained one (its eval
accuracy over HTTP is the trial's). Plus ``omninet serve``'s bad-input exits."""

from __future__ import annotations

import asyncio
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
from omninet.sweep.localservers import free_port

pytestmark = pytest.mark.slow  # ~60-75 s on a busy 2-core machine: training, Ray and Serve start-up
TIMEOUT = 20  # seconds, every request
TRIAL = {**LISTOPS_SERVE_TRIAL, "train": {**LISTOPS_SERVE_TRIAL["train"], "steps": 10},
         "measure": {**LISTOPS_SERVE_TRIAL["measure"], "allow_other_length": True}}  # served at 512, trained shorter


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return quick_trained_model(TRIAL, tmp_path_factory.mktemp("served") / "trial-000004", sweep="t", pool="cpu", trial=4)


@pytest.fixture(scope="module")
def url(model_dir, ray_cluster):
    """The model served by Ray Serve on the session cluster (tests/conftest.py)."""
    from ray import serve

    from omninet.serve.app import serve_model

    try:
        # A wide batching window so that concurrent requests really share batches.
        yield serve_model(model_dir, host="127.0.0.1", port=free_port(), max_batch_size=8, batch_wait_timeout_s=0.05,
                          max_batch_tokens=1024, num_threads=1, ray_actor_options={"num_cpus": 1})
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def trained(model_dir):
    return load_trial_model(model_dir)


def post(url: str, body) -> requests.Response:
    if isinstance(body, (dict, list)):
        return requests.post(f"{url}/predict", json=body, timeout=TIMEOUT)
    return requests.post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def raw_http(url: str, head: str, body_parts: list[bytes]) -> tuple[int, dict]:
    """Sends a request head and body parts on a plain socket, leaving the body unfinished, and
    reads the response: a 413 that arrives means the server answered without the rest."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode())
        for part in body_parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(response: bytes) -> int:
    head = response.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next((int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


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


@pytest.mark.parametrize("body, needle", [
    ({"text": "[MAX 2 " + "z" * 200_000 + " ]"}, "unknown ListOps token"),
    ({"input_ids": [2, 10, 5], "q" * 100_000: 1}, "unknown field"),
    ({"input_ids": [2, 10, 5], "truncate": "y" * 100_000}, "true or false"),
    ({"input_ids": [2, int("9" * 4000), 5]}, "outside the vocabulary"),
])
def test_an_error_quotes_at_most_80_characters_of_the_input(url, body, needle) -> None:
    r = post(url, body)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert needle in error and "characters)" in error and len(error) < 300, error[:300]


def test_a_body_over_the_limit_is_refused_from_its_content_length_unread(url) -> None:
    # The head announces 5 MB and only a few bytes follow: the 413 comes without the rest.
    head = ("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 5000000\r\n\r\n")
    status, out = raw_http(url, head, [b'{"text": "'])
    assert status == 413 and "5000000 bytes" in out["error"] and "at most 1048576" in out["error"], out
    r = post(url, json.dumps({"text": "[MAX 2 9 ]"}).ljust(5_000_000).encode())  # a whole 5 MB body, same answer
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(url) -> None:
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b" " * 65536
    chunks = [b'%x\r\n%s\r\n' % (len(piece), piece)] * 17  # 1.06 MiB and no last chunk: the server stops reading
    status, out = raw_http(url, head, chunks)
    assert status == 413 and "over 1048576 bytes" in out["error"], out


def test_bodies_under_the_limit_are_read_whole_chunked_or_not(url) -> None:
    text = json.dumps({"input_ids": [2, 10, 17, 5]})
    assert post(url, text.ljust(2**20 - 16).encode()).status_code == 200  # padded to just under 1 MiB
    r = requests.post(f"{url}/predict", data=(part.encode() for part in (text[:5], text[5:])),
                      headers={"Content-Type": "application/json"}, timeout=TIMEOUT)  # a generator: chunked
    assert r.status_code == 200, r.text


def test_read_body_never_reads_past_the_limit() -> None:
    from starlette.requests import Request

    from omninet.serve.app import read_body
    from omninet.serve.predictor import RequestError

    def request(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[Request, list[int]]:
        calls = []

        async def receive():
            calls.append(1)
            return {"type": "http.request", "body": chunks[len(calls) - 1], "more_body": len(calls) < len(chunks)}

        return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive), calls

    declared, calls = request([(b"content-length", b"2000")], [b"x" * 1000] * 2)
    with pytest.raises(RequestError, match="2000 bytes"):
        asyncio.run(read_body(declared, 1500))
    assert calls == []  # refused from the header alone
    chunked, calls = request([(b"transfer-encoding", b"chunked")], [b"x" * 1000] * 10)
    with pytest.raises(RequestError, match="over 1500 bytes") as exc:
        asyncio.run(read_body(chunked, 1500))
    assert exc.value.status == 413 and len(calls) == 2  # stopped at the chunk that passed the limit
    whole, _ = request([], [b"ab", b"cd"])
    assert asyncio.run(read_body(whole, 4)) == b"abcd"


def test_error_messages_clip_long_runs_of_input() -> None:
    from omninet.serve.predictor import QUOTE_CHARS, RequestError, clip

    token = "q" * 10_000
    message = RequestError(400, f"text[0]: unknown ListOps token {token!r}; known: ( ) [MAX").message
    assert message.startswith("text[0]: unknown ListOps token 'qqq") and message.endswith("; known: ( ) [MAX")
    assert "... (10000 characters)'" in message and len(message) < 2 * QUOTE_CHARS + 60
    assert clip("short") == "short" and clip("x" * 81) == "x" * 80 + "... (81 characters)"


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
    bad = [{"input_ids": [2, 99, 5]}, {"input_ids": [9] * 600}, "{oops", {"text": "[MAX x ]"},
           json.dumps({"input_ids": [2, 10, 5]}).ljust(2 * 2**20)]  # the last one past the body limit
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
    assert omninet_main(["serve", str(model_dir), "--write-config", str(out), "--replicas", "2", "--num-cpus", "1",
                         "--max-body-bytes", "4096"]) == 0
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["import_path"] == "omninet.serve.app:app_builder"
    assert app["args"]["model_dir"] == str(model_dir.resolve()) and app["args"]["num_replicas"] == 2
    assert app["args"]["max_body_bytes"] == 4096
    from omninet.serve.app import app_builder

    assert app_builder(app["args"]) is not None  # the builder accepts the file's args
