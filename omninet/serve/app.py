"""A trial's trained model on Ray Serve, with dynamic batching by length bucket.

    from omninet.serve.app import build_app, serve_model
    url = serve_model("results/models/pool=cpu/trial-000007", port=8000)   # embedded local Ray
    # POST {url}/predict {"text": "[MAX 2 9 ]"} -> {"predictions": [9], "probabilities": [[...]], "model": {...}}
    # GET  {url}/health                        -> {"status": "ok", "model": {...}}

One deployment (``OmniNetServer``) takes HTTP directly. Its handler reads the body up to
``max_body_bytes`` (413 past it: from Content-Length before reading anything, else as soon as a
chunked body passes it; the replica never holds more, and Ray's proxy stops reading the socket
once the 413 is sent), then parses and validates the request (``omninet.serve.predictor``: 400
for malformed input, 413 for too long; a message quotes at most 80 characters of any input), so
only valid inputs are ever batched. Each input then goes to the batch queue of its length
bucket (``omninet.buckets``): one ``@serve.batch`` queue per bucket, so a batch pads to its
bucket, not to the longest request in flight; a bucket's batch holds at most
``max_batch_tokens`` tokens (``max_batch_size`` rows at most). A forward runs on the replica's
event loop and holds it: requests that arrive meanwhile wait at the replica, and the next batch
takes all of them. Ray Serve forms a batch when its wait ends, not when the model is free. So
with the forward on a worker thread, as before, the loop kept cutting batches of one or two
every ``batch_wait_timeout_s`` while they queued behind the model, even under overload.
``max_batch_size=1`` is plain batch-1 serving through the same path.

On a cluster: ``ray job submit -- omninet serve RESULTS_DIR --pool P --host 0.0.0.0``, or
``omninet serve ... --write-config serve.yaml`` then ``serve deploy serve.yaml`` (the file
points at ``app_builder`` below).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse
import torch

from omninet.artifacts import load_trial_model
from omninet.serve.predictor import Predictor, RequestError, one_line

__all__ = ["DEFAULT_BATCH_WAIT_TIMEOUT_S", "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_BATCH_TOKENS", "DEFAULT_MAX_BODY_BYTES",
           "OmniNetServer", "app_builder", "build_app", "pool_actor_options", "read_body", "serve_model"]

log = logging.getLogger("omninet.serve")

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01
# Rows x bucket length per forward. Past it a bigger batch is no cheaper per sequence on CPU
# (benchmarks/serving.py's forward_ceiling: at 512 tokens batch 32 costs more per sequence than
# batch 1), so long buckets get smaller batches. A per-bucket cap, not a batch_size_fn.
DEFAULT_MAX_BATCH_TOKENS = 4096
# A full request (256 inputs of 512 token ids) is about 0.5 MB of JSON; a bigger body is refused unread.
DEFAULT_MAX_BODY_BYTES = 2**20


def batch_limits(buckets: list[int], max_batch_size: int, max_batch_tokens: int | None) -> dict[int, int]:
    """Rows per forward for each length bucket: ``max_batch_size`` capped at ``max_batch_tokens``
    tokens (rows x bucket length), at least one row."""
    return {b: max(1, min(max_batch_size, (max_batch_tokens or b * max_batch_size) // b)) for b in buckets}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message, "error")}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ``RequestError`` 413 as soon as it is known to exceed ``limit``
    bytes: from Content-Length before reading anything, else while reading (chunked bodies),
    so no more than ``limit`` bytes (plus one chunk) are ever held."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared)} bytes; the server accepts at most {limit} "
                                "(--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body over {limit} bytes; the server accepts at most {limit} "
                                    "(--max-body-bytes)")
    return bytes(body)


@serve.deployment(name="OmniNetServer", graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=10,
                  health_check_period_s=5)
class OmniNetServer:
    """Serves one trained trial model: ``POST /predict``, ``GET /health``, ``GET /stats``."""

    def __init__(self, model_dir: str, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, num_threads: int | None = None,
                 device: str = "auto", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor(load_trial_model(model_dir, device=device))
        self.max_batch_size = max_batch_size
        self.max_body_bytes = max_body_bytes
        self._batch_sizes: dict[int, int] = {}  # batch size -> count, for the benchmark's histogram
        self.batch_limits = batch_limits(self.predictor.buckets, max_batch_size, max_batch_tokens)
        self._queues = {b: self._make_queue(n, batch_wait_timeout_s) for b, n in self.batch_limits.items()}
        # Warm every bucket once so the first request of each length is not the slow one.
        for b in self.predictor.buckets:
            self.predictor.run_batch([[0] * b])

    def _make_queue(self, max_batch_size: int, batch_wait_timeout_s: float):
        # One queue per bucket: a batch holds inputs of one bucket only. No batch_size_fn (Ray
        # Serve hangs when one raises); the batch size is the number of inputs.
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def run(sequences: list[list[int]]) -> list[Any]:
            self._batch_sizes[len(sequences)] = self._batch_sizes.get(len(sequences), 0) + 1
            try:  # on the loop, on purpose (see the module docstring)
                return self.predictor.run_batch(sequences)
            except Exception as exc:  # noqa: BLE001 -- a lone item's failure goes back to its own request
                return [exc] * len(sequences)

        return run

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path.endswith("/health"):
            return JSONResponse({"status": "ok", "model": self.predictor.identity})
        if path.endswith("/stats"):
            return JSONResponse({"batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                                 "max_batch_size": self.max_batch_size,
                                 "max_batch_size_per_bucket": {str(b): n for b, n in self.batch_limits.items()}})
        if not path.endswith("/predict"):
            return _error(404, f"no route {path}; use POST /predict or GET /health")
        if request.method != "POST":
            return _error(405, "use POST /predict with a JSON body")
        try:
            inputs = self.predictor.parse(await read_body(request, self.max_body_bytes))
        except RequestError as exc:
            return _error(exc.status, exc.message)
        start = time.perf_counter()
        results = await asyncio.gather(*(self._queues[self.predictor.bucket_of(s)](s) for s in inputs.sequences))
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            log.warning("predict failed: %s", failed)
            return _error(500, f"inference failed: {type(failed).__name__}: {failed}")
        return JSONResponse({
            "predictions": [r["prediction"] for r in results],
            "probabilities": [r["probabilities"] for r in results],
            "truncated": inputs.truncated,
            "model": self.predictor.identity,
            "server_ms": round(1000 * (time.perf_counter() - start), 3),
        })


def pool_actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """A sweep pool's Ray resources (``{'CPU': 2, 'GPU': 1, 'accelerator_type:H100': 1}``) as
    Serve's ``ray_actor_options``."""
    resources = dict(resources or {})
    out: dict[str, Any] = {"num_cpus": float(resources.pop("CPU", 1))}
    if "GPU" in resources:
        out["num_gpus"] = float(resources.pop("GPU"))
    if resources:
        out["resources"] = {k: float(v) for k, v in resources.items()}
    return out


def build_app(model_dir: str | Path, *, num_replicas: int = 1, ray_actor_options: dict[str, Any] | None = None,
              max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
              max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, max_ongoing_requests: int | None = None,
              num_threads: int | None = None, device: str = "auto", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The Serve application for a trial-model folder (see ``save_trial_model``)."""
    for name, value, low in (("num_replicas", num_replicas, 1), ("max_batch_size", max_batch_size, 1),
                             ("max_body_bytes", max_body_bytes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(batch_wait_timeout_s, (int, float)) or batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number >= 0, got {batch_wait_timeout_s!r}")
    Predictor(load_trial_model(model_dir))  # fail here, with the reason, not in a replica that retries forever
    # Enough requests in flight per replica to fill a batch in every bucket's queue.
    ongoing = max_ongoing_requests or max(64, 4 * max_batch_size)
    deployment = OmniNetServer.options(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1},
                                       max_ongoing_requests=ongoing, max_queued_requests=-1)
    return deployment.bind(str(Path(model_dir).resolve()), max_batch_size=max_batch_size,
                           batch_wait_timeout_s=batch_wait_timeout_s, max_batch_tokens=max_batch_tokens,
                           num_threads=num_threads, device=device, max_body_bytes=max_body_bytes)


def app_builder(args: dict[str, Any]):
    """Entry point for a Serve config file (``import_path: omninet.serve.app:app_builder``)."""
    args = dict(args)
    return build_app(args.pop("model_dir"), **args)


def serve_model(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, name: str = "omninet",
                route_prefix: str = "/", request_timeout_s: float | None = 30.0, **app_options) -> str:
    """Starts (or joins) Ray and Serve's HTTP proxy on ``host:port`` and deploys the model;
    returns its base URL. Stop with ``serve.shutdown()``. ``app_options`` go to ``build_app``."""
    app = build_app(model_dir, **app_options)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def serve_config(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, name: str = "omninet",
                 num_replicas: int = 1, ray_actor_options: dict[str, Any] | None = None, **app_args) -> dict[str, Any]:
    """A Serve config file's content (``serve deploy FILE`` on a cluster) for the model."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port, "request_timeout_s": 30},
        "applications": [{
            "name": name, "route_prefix": "/", "import_path": "omninet.serve.app:app_builder",
            "args": {"model_dir": str(Path(model_dir).resolve()), "num_replicas": num_replicas,
                     "ray_actor_options": ray_actor_options or {"num_cpus": 1}, **app_args},
        }],
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(serve_config("MODEL_DIR"), indent=2))
