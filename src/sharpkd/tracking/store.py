"""Where runs go: the tracking store of this project, and a client that serialises sqlite writers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from sharpkd.config import TrackingParams
from sharpkd.errors import UserError

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_LOCK_TIMEOUT_S = 900  # a writer holds the lock for at most a few seconds (model logging)


def project_root() -> Path:
    """$DVC_ROOT, else the nearest folder up from here with a dvc.yaml, else the current folder;
    never a queued experiment's copy under .dvc/tmp/exps."""
    if os.environ.get("DVC_ROOT"):
        path = Path(os.environ["DVC_ROOT"]).resolve()
    else:
        here = Path.cwd().resolve()
        path = next((p for p in (here, *here.parents) if (p / "dvc.yaml").is_file()), here)
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


@dataclasses.dataclass(frozen=True)
class Store:
    uri: str
    artifact_root: Path | None  # for the experiment we create; None: the server decides
    lock_path: Path | None  # sqlite only


def resolve_store(tp: TrackingParams | None, root: Path | None = None) -> Store:
    """The tracking store for these params (see the module docstring for the order)."""
    root = project_root() if root is None else Path(root)
    uri = (tp.uri if tp else "") or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///"):
        rest, sep, query = uri[len("sqlite:///") :].partition("?")
        db = Path(rest)
        if not db.is_absolute():
            db = root / db
        return Store(
            f"sqlite:///{db}{sep}{query}", db.parent / ARTIFACTS_DIR, db.with_name(db.name + ".lock")
        )
    if uri.startswith("sqlite:"):
        raise UserError(
            f"tracking: '{uri}' is not a usable SQLite URI; use sqlite:///relative.db or sqlite:////abs.db"
        )
    return Store(uri, None, None)


class LockedClient:
    """An MlflowClient whose calls are serialised across processes (sqlite) and retried when busy."""

    def __init__(self, store: Store):
        from mlflow import MlflowClient

        self.store = store
        if store.lock_path is not None:
            from filelock import FileLock

            store.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(store.lock_path), timeout=_LOCK_TIMEOUT_S)
        else:
            self._lock = contextlib.nullcontext()
        self.client = self.call(MlflowClient, store.uri)  # creates the tables on first use

    def call(self, fn: Callable, *args, **kwargs):
        delay = 0.1
        for attempt in range(8):
            try:
                with self._lock:
                    return fn(*args, **kwargs)
            except Exception as exc:
                if "database is locked" not in str(exc) or attempt == 7:
                    raise
                time.sleep(delay)
                delay *= 2

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        return lambda *a, **k: self.call(method, *a, **k)
