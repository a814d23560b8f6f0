"""Where runs go: the tracking store of this project, and a client that serialises sqlite writers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sharpkd.config import TrackingParams
from sharpkd.errors import UserError

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_LOCK_TIMEOUT_S = 900  # a writer holds the lock for at most a few seconds (model logging)
# A server that is slow or gone costs seconds, not minutes (MLflow's defaults: 120 s, 7 retries, backoff 2).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
}
PROBE_TIMEOUT_S = 5.0
_SQLITE_HEADER = b"SQLite format 3\x00"
# Where MLflow keeps artifact locations (absolute URIs): rewritten when the store was copied or moved.
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


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

    @property
    def db_path(self) -> Path | None:
        """The SQLite file (None for a server)."""
        return None if self.lock_path is None else self.lock_path.with_suffix("")

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))


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


def unreachable(store: Store, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a tracking server does not answer its /health page within `timeout` s (None: it answers,
    whatever the status, or the store is no server, or it cannot be told here: TLS or URL details
    are MLflow's to judge)."""
    if not store.is_server:
        return None
    try:
        with urllib.request.urlopen(store.uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except (urllib.error.HTTPError, ValueError):
        return None  # it answered; or a URL urllib does not take
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, ssl.SSLError):
            return None
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:.0f} s"
        return (reason.strerror if isinstance(reason, OSError) else None) or str(reason)


def check_reachable(store: Store) -> None:
    """UserError, within seconds, when the store is a server that does not answer."""
    why = unreachable(store)
    if why is not None:
        raise UserError(
            f"tracking: the MLflow server {store.uri} cannot be reached ({why}); start it, point "
            "tracking.uri / MLFLOW_TRACKING_URI at one that runs, or set tracking.enabled: false in "
            "params.yaml to run without tracking"
        )


def check_db(store: Store) -> None:
    """UserError when the store's SQLite file exists but is empty or not a database: MLflow would
    silently start a new, empty store in it while mlartifacts/ still holds the old runs."""
    db = store.db_path
    if db is None or not db.is_file():
        return
    with db.open("rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head == _SQLITE_HEADER:
        return
    what = "is empty (0 bytes)" if not head else "is not an SQLite database (corrupt)"
    aside = f"it and {store.artifact_root}/" if store.artifact_root.is_dir() else "it"
    raise UserError(
        f"tracking: the MLflow store {db} {what}; restore it from a backup, or move {aside} aside to "
        "start a new store (or set tracking.enabled: false)"
    )


# MLflow's own default artifact root, where it puts the Default experiment (`<cwd>/mlruns/0`, a bare path).
_MLRUNS = re.compile(r"(?P<scheme>file://)?(?P<folder>/.*)/mlruns/(?P<id>[0-9]+)")


def _moved_roots(store: Store, locations: set[str]) -> dict[str, str]:
    """Old artifact root -> this store's, for the experiment locations that lie in another folder: another
    checkout's `mlartifacts`, or MLflow's default `<folder>/mlruns/<id>` (the Default experiment)."""
    folder, new = store.db_path.parent, store.artifact_root.as_uri()
    moved = {}
    for loc in locations:
        if loc != new and loc.startswith("file://") and loc.endswith("/" + ARTIFACTS_DIR):
            moved[loc] = new
        elif (m := _MLRUNS.fullmatch(loc)) and Path(m["folder"]) != folder:
            mine = folder / "mlruns" / m["id"]
            moved[loc] = mine.as_uri() if m["scheme"] else str(mine)
    return moved


def relocate_artifacts(store: Store) -> int:
    """Point the artifact locations recorded in a copied or moved SQLite store at the folder beside it;
    how many experiments had moved.

    MLflow records absolute locations: a copy of the checkout would write its artifacts into the
    original's mlartifacts/ (a moved one into a folder that is gone), and the Default experiment's into
    the original's mlruns/0. Every location under another folder's `mlartifacts`, or MLflow's default
    `<folder>/mlruns/<id>`, becomes the same path under this store's folder.
    """
    db = store.db_path
    if db is None or not db.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'experiments'").fetchone():
            return 0  # a new store: MLflow creates its tables
        found = {loc for (loc,) in con.execute("SELECT artifact_location FROM experiments") if loc}
        moved = _moved_roots(store, found)
        for old, new in moved.items():
            for table, column in _LOCATION_COLUMNS:
                if column not in {row[1] for row in con.execute(f"PRAGMA table_info({table})")}:
                    continue
                con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"),
                )
    return len(moved)


class LockedClient:
    """An MlflowClient whose calls are serialised across processes (sqlite) and retried when busy.

    A SQLite store is checked (check_db) and its artifact locations follow the checkout
    (relocate_artifacts); a server gets short timeouts and few retries (HTTP_DEFAULTS) unless the
    user set MLflow's own variables.
    """

    def __init__(self, store: Store):
        from mlflow import MlflowClient

        self.store = store
        if store.lock_path is not None:
            from filelock import FileLock

            store.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(store.lock_path), timeout=_LOCK_TIMEOUT_S)
            with self._lock:
                check_db(store)
                relocate_artifacts(store)
        else:
            self._lock = contextlib.nullcontext()
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
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
