"""`sharpkd ui`: the MLflow UI command for this project's store."""

from __future__ import annotations

import sys
from pathlib import Path

from sharpkd.tracking.store import check_db, project_root, resolve_store


def ui_command(port: int, params_path: str | Path = "params.yaml") -> tuple[list[str] | None, str]:
    """The `mlflow ui` command line for this project's store, and a line for the user.

    Returns (None, message) when the store is a tracking server: it has its own UI.
    """
    from sharpkd.config import load_params

    root = project_root()
    path = Path(params_path)
    path = path if path.is_absolute() else root / path
    tp = load_params(path).tracking if path.is_file() else None
    store = resolve_store(tp, root)
    if store.lock_path is None:
        return None, f"tracking goes to {store.uri}: open that address in a browser (it serves the MLflow UI)"
    check_db(store)  # the UI would start a new, empty store in an empty mlflow.db
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store.uri,
        # Runs made by the pipeline carry their own artifact location; this is for runs made in the UI.
        "--artifacts-destination",
        str(store.artifact_root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    note = f"MLflow UI on http://127.0.0.1:{port} (store {store.uri}); Ctrl-C stops it"
    if tp is not None and not tp.enabled:
        note += "\nnote: tracking.enabled is false in params.yaml, so the pipeline records nothing new"
    try:
        killed = _close_orphans(store)
    except Exception as exc:  # the UI is still worth starting: it shows the store as it is
        note += f"\nnote: could not look for runs left RUNNING by killed stages ({exc})"
        killed = 0
    if killed:
        note += f"\nnote: {killed} run(s) left RUNNING by a killed stage are now marked KILLED"
    return cmd, note


def _close_orphans(store) -> int:
    """Mark the runs of stages that were killed (their process is gone) KILLED; how many there were."""
    if not store.db_path.is_file():
        return 0
    from sharpkd.tracking.runs import mark_orphans_killed
    from sharpkd.tracking.store import LockedClient

    client = LockedClient(store)
    return len(mark_orphans_killed(client, [e.experiment_id for e in client.search_experiments()]))
