"""Throwaway PostgreSQL and MLflow tracking servers on 127.0.0.1, for the platform's tests and
the records soak benchmark (``benchmarks/records_soak.py``); never for real sweeps.

PostgreSQL refuses to run as root, so when this process is root the data directory belongs to
an unprivileged system user (``omnipg``, created when missing) and the server runs as that user.
Authentication is ``trust`` on 127.0.0.1: the server is private to the test and dies with it.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalPostgres", "LocalMlflowServer", "free_port", "postgres_bin"]

PG_USER = "omnipg"  # the OS user the server runs as when we are root
PG_ROLE = "omninet"  # the database superuser the platform connects as


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``: on $PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


class LocalPostgres:
    """``initdb`` into a fresh temporary directory, ``pg_ctl start`` on a free 127.0.0.1 port.
    ``durable=False`` turns fsync off (tests); the soak keeps PostgreSQL's defaults."""

    def __init__(self, *, port: int | None = None, durable: bool = False) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
        self.port = port or free_port()
        self.durable = durable
        # not under pytest's tmp_path: its parents are mode 0700, which the server's user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="omninet-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            if subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                               check=True, capture_output=True)
            shutil.chown(self.root, PG_USER, PG_USER)
            self._as_user = ["runuser", "-u", PG_USER, "--"]
        self._sh([str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_ROLE, "--auth=trust", "-E", "UTF8",
                  "--no-instructions"])

    def _sh(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._as_user + cmd, capture_output=True, text=True, **kw)
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {proc.stderr[-2000:]}{tail}")
        return proc

    def start(self) -> "LocalPostgres":
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._sh([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                  "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        self._sh([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL naming the driver: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3."""
        return f"postgresql+psycopg2://{PG_ROLE}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_ROLE}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2  # optional: psycopg2 (the [postgres] extra)

        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class LocalMlflowServer:
    """``mlflow server`` with a PostgreSQL (or any SQLAlchemy) backend store and a file
    artifact destination, on 127.0.0.1; ``stop()`` and ``start()`` again on the same port
    simulate an outage."""

    def __init__(self, backend_store_uri: str, artifacts: Path, *, port: int | None = None) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts = Path(artifacts)
        self.port = port or free_port()
        self.log = self.artifacts.parent / f"mlflow-server-{self.port}.log"
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "LocalMlflowServer":
        return self.launch().wait(timeout)

    def launch(self) -> "LocalMlflowServer":
        """Starts the server without waiting (it takes seconds to import): call :meth:`wait`."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait(self, timeout: float = 180.0) -> "LocalMlflowServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy within {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)  # the server and its uvicorn/gunicorn workers
            self._proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None
        deadline = time.time() + 30
        while time.time() < deadline and self.healthy():  # the port is free before start() reuses it
            time.sleep(0.1)
