"""`sharpkd ui`: the MLflow UI command for this project's store."""

from __future__ import annotations

import sys
from pathlib import Path

from sharpkd.tracking.store import project_root, resolve_store


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
    return cmd, note
