"""Where a sweep's search state lives: Optuna's RDB storage (SQLite in the results directory
by default, or any SQLAlchemy URL such as postgresql://...)."""

from __future__ import annotations

import optuna

__all__ = ["optuna_storage"]


def optuna_storage(url: str) -> optuna.storages.BaseStorage | str:
    """Optuna's RDB storage; on SQLite in WAL mode with ``synchronous=NORMAL``: a commit costs
    no fsync (several per trial), and readers (dashboards, ``SweepResult``) never block the
    controller. Durability stays per transaction for a process crash; WAL may lose the last
    commits only on a power loss, which resume tolerates (the trial is re-run)."""
    if not url.startswith("sqlite:"):
        return url
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    def pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables predate the listener
    return storage
