"""One controller per sweep: a lock held for the sweep's whole life.

- PostgreSQL storage: a session-level advisory lock keyed by the sweep name, on a connection of
  its own whose ``application_name`` names the holder (controller id, PID, host). The server
  drops it when that connection ends, so a killed controller's lock is gone by the next run
  (TCP keepalives bound how long a vanished host holds it).
- SQLite (and any other URL): ``flock`` on ``<sweep>.sweep.lock`` next to the database file
  (the results directory otherwise), holding the holder's identity as JSON. The kernel drops it
  when the holder dies. (``flock`` by hand, not the ``filelock`` package: filelock truncates the
  file on every attempt, which would erase the holder's name that a second controller prints.)

A second controller gets :class:`SweepLockedError` (a :class:`SweepConfigError`: the CLI exits 2
with one line) before anything is written. Because the lock guarantees that no other controller
of the sweep is alive, runs and trials left unfinished by any other controller id belong to a
dead one, and only those are cleaned up (:meth:`SweepLock.is_live`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omninet.sweep.config import SweepConfigError
from omninet.sweep.storage import postgres_connect_args, sqlalchemy_url, transient, with_retry

__all__ = ["ControllerId", "SweepLock", "SweepLockedError", "SweepLockLost", "sweep_lock"]

log = logging.getLogger("omninet.sweep")


class SweepLockedError(SweepConfigError):
    """Another live controller holds the sweep."""


class SweepLockLost(RuntimeError):
    """The lock went away with the store, and another controller took the sweep meanwhile."""


@dataclass(frozen=True)
class ControllerId:
    """Who runs a sweep: a fresh id per controller, plus where it runs. Trial runs in MLflow are
    tagged with it, so cleanup after a crash can tell whose runs it touches."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    since: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def describe(self) -> str:
        return f"controller {self.id} on host {self.host}, pid {self.pid}, since {self.since}"


class SweepLock:
    """Base: ``acquire()`` once, ``ensure()`` after a store outage, ``release()`` at the end."""

    def __init__(self, sweep: str, identity: ControllerId) -> None:
        self.sweep, self.identity = sweep, identity

    def acquire(self) -> "SweepLock":
        raise NotImplementedError

    def ensure(self) -> None:
        """Raises :class:`SweepLockLost` when the lock is no longer ours."""

    def release(self) -> None:
        raise NotImplementedError

    def is_live(self, controller_id: str | None) -> bool:
        """Whether a controller of this sweep may still be writing: only the lock holder (us)."""
        return controller_id == self.identity.id

    def _locked(self, holder: str) -> SweepLockedError:
        return SweepLockedError(f"sweep {self.sweep!r} is already run by {holder}; wait for it to finish or "
                                "stop it (a killed controller's lock is recovered on the next run)")


class FileSweepLock(SweepLock):
    def __init__(self, sweep: str, identity: ControllerId, path: Path) -> None:
        super().__init__(sweep, identity)
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "FileSweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                holder = ControllerId(**json.loads(text)).describe()
            except (ValueError, TypeError):
                holder = f"another controller (lock file {self.path})"
            raise self._locked(holder) from None
        text = json.dumps(asdict(self.identity)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale holder name; the flock goes with the descriptor
            os.close(self._fd)
            self._fd = None


class PostgresSweepLock(SweepLock):
    PREFIX = "omninet"

    def __init__(self, sweep: str, identity: ControllerId, url: str, *, retry_s: float = 120.0) -> None:
        super().__init__(sweep, identity)
        import sqlalchemy  # heavy: sqlalchemy (PostgreSQL lock only)

        digest = hashlib.sha256(f"omninet.sweep:{sweep}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)  # pg_try_advisory_lock(bigint)
        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        self._classid, self._objid = unsigned >> 32, unsigned & 0xFFFFFFFF  # how pg_locks shows a bigint key
        name = f"{self.PREFIX} ctl={identity.id} pid={identity.pid} host={identity.host}"[:63]
        self.retry_s = retry_s
        self._engine = sqlalchemy.create_engine(
            sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool,
            connect_args={**postgres_connect_args(url), "application_name": name})
        self._conn = None
        self._checked = 0.0

    def _try(self) -> bool:
        self._conn = self._engine.connect()
        got = self._conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({self.key})").scalar()
        self._conn.commit()
        return bool(got)

    def _holder(self) -> str:
        row = self._conn.exec_driver_sql(
            "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            f"AND l.classid = {self._classid} AND l.objid = {self._objid} AND l.objsubid = 1").first()
        self._conn.rollback()
        if row is None:
            return "another controller (it just released the lock: run again)"
        parts = dict(p.split("=", 1) for p in str(row[0]).split()[1:] if "=" in p)
        if {"ctl", "pid", "host"} <= set(parts):
            since = row[2].astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if row[2] else "?"
            return f"controller {parts['ctl']} on host {parts['host']}, pid {parts['pid']}, since {since}"
        return f"PostgreSQL session {row[0]!r} from {row[1]}"

    def acquire(self) -> "PostgresSweepLock":
        got = with_retry(self._try, what="taking the sweep lock", budget_s=self.retry_s)
        if not got:
            holder = self._holder()
            self._close()
            raise self._locked(holder)
        self._checked = time.monotonic()
        return self

    def ensure(self, *, every_s: float = 2.0) -> None:
        """A PostgreSQL restart ends the session and with it the lock: take it again (with the
        store's retry budget); if another controller got it first, stop."""
        if time.monotonic() - self._checked < every_s:
            return
        self._checked = time.monotonic()
        try:
            self._conn.exec_driver_sql("SELECT 1").scalar()
            self._conn.rollback()
            return
        except Exception as exc:  # noqa: BLE001
            if not transient(exc):
                raise
        self._close()
        log.warning("sweep lock: the PostgreSQL session ended (restart?); taking the lock again")
        if not with_retry(self._try, what="taking the sweep lock again", budget_s=self.retry_s):
            holder = self._holder()
            self._close()
            raise SweepLockLost(f"sweep {self.sweep!r}: lost the lock during a PostgreSQL outage and "
                                f"{holder} took the sweep; this controller stops (its records are safe)")
        log.info("sweep lock: held again")

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - a dead connection
                pass
            self._conn = None

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self.key})")
                self._conn.commit()
            except Exception:  # noqa: BLE001 - the session ending releases it anyway
                pass
        self._close()
        self._engine.dispose()


def sweep_lock(sweep: str, optuna_url: str, results_dir: Path, identity: ControllerId, *,
               retry_s: float = 120.0) -> SweepLock:
    """The lock that fits where the sweep's search state lives (not yet acquired)."""
    from sqlalchemy.engine import make_url  # heavy: sqlalchemy

    url = make_url(optuna_url)
    if url.get_backend_name() == "postgresql":
        return PostgresSweepLock(sweep, identity, optuna_url, retry_s=retry_s)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return FileSweepLock(sweep, identity, Path(url.database).parent / f"{sweep}.sweep.lock")
    log.warning("sweep lock: no database lock for %s; a file lock in %s guards only drivers that share it",
                url.get_backend_name(), results_dir)
    return FileSweepLock(sweep, identity, Path(results_dir) / f"{sweep}.sweep.lock")
