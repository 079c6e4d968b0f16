"""Where a sweep's search state lives: Optuna's RDB storage (SQLite in the results directory
by default, or PostgreSQL shared by many drivers), and how the controller rides out a store
that goes away for a while (:func:`with_retry`)."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, TypeVar

import optuna

__all__ = ["optuna_storage", "with_retry", "transient", "sqlalchemy_url", "postgres_connect_args"]

log = logging.getLogger("omninet.sweep")
T = TypeVar("T")


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; with only psycopg2 installed
    (the ``postgres`` extra) it is used instead, so both spellings work."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg  # noqa: F401  optional: psycopg (probed)
        except ImportError:
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def postgres_connect_args(url: str) -> dict[str, Any]:
    """libpq TCP keepalives: a connection to a vanished server (or from a vanished controller,
    which holds the sweep lock) is noticed within ~30 s instead of the kernel's two hours."""
    if not url.startswith("postgres"):
        return {}
    return {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "connect_timeout": 10}


def optuna_storage(url: str) -> optuna.storages.BaseStorage | str:
    """Optuna's RDB storage.

    SQLite: WAL mode with ``synchronous=NORMAL``: a commit costs no fsync (several per trial), and
    readers (dashboards, ``SweepResult``) never block the controller. Durability stays per
    transaction for a process crash; WAL may lose the last commits only on a power loss, which
    resume tolerates (the trial is re-run).

    PostgreSQL: ``pool_pre_ping`` so pooled connections that a server restart closed are
    replaced instead of failing the next call, plus TCP keepalives."""
    if url.startswith("postgres"):
        url = sqlalchemy_url(url)
        kwargs = {"pool_pre_ping": True, "connect_args": postgres_connect_args(url)}
        # two drivers creating Optuna's tables in a fresh database at once: the loser retries
        return with_retry(lambda: optuna.storages.RDBStorage(url, engine_kwargs=kwargs), what="opening Optuna's storage",
                          budget_s=60.0, is_transient=lambda exc: True)
    if not url.startswith("sqlite:"):
        return url
    from sqlalchemy import event  # heavy: sqlalchemy

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    def pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables predate the listener
    return storage


def transient(exc: BaseException) -> bool:
    """A store that went away (connection refused or closed, server restarting, timeout), as
    opposed to a bad request: worth retrying. Optuna wraps SQLAlchemy errors in
    ``StorageInternalError``, so the whole cause chain is looked at."""
    import sqlalchemy.exc as sa  # heavy: sqlalchemy

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, ConnectionError,
                            TimeoutError)):
            return True
        if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def with_retry(fn: Callable[[], T], *, what: str, budget_s: float = 120.0, first_s: float = 0.5, max_s: float = 15.0,
               is_transient: Callable[[BaseException], bool] = transient, on_retry: Callable[[], None] | None = None) -> T:
    """``fn()``, retried on transient store errors with exponential backoff (``first_s`` doubling,
    at most ``max_s`` a wait, with jitter) for at most ``budget_s`` in all, then the error is raised.
    A small loop rather than ``tenacity``: one function, and the controller needs ``on_retry``
    (re-checking what a failed call may have done) more than a retry DSL.
    ``fn`` must be safe to call again: callers make non-idempotent calls so (see ``_tell``)."""
    deadline = time.monotonic() + budget_s
    wait, attempt = first_s, 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by is_transient
            attempt += 1
            if not is_transient(exc) or time.monotonic() + wait > deadline:
                raise
            (log.warning if attempt == 1 else log.debug)(
                "%s: store unavailable (%s); retrying for up to %.0f s", what,
                " ".join(f"{type(exc).__name__}: {exc}".split())[:200], max(0.0, deadline - time.monotonic()))
            time.sleep(wait * (0.8 + 0.4 * random.random()))
            wait = min(max_s, wait * 2)
            if on_retry is not None:
                on_retry()
