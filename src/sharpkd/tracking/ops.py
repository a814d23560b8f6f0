"""What a stage's tracker sends to the store, as plain data: applied at once, or kept (outage.py) and
applied later, the same way.

An operation is a JSON-able dict with an `op` name and the run it is for; file arguments (`path`,
`example`) are paths. `objects` carries what is not JSON (the model's input example) when an
operation is applied at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE_FIELDS = ("path", "example")  # operation fields that name a file or folder

SERVING_FLAVOR = "sharpkd.deploy.serving"  # the MLflow flavor of the registered student


def _file(op: dict, key: str, folder: Path | None) -> str:
    path = Path(op[key])
    return str(path if folder is None or path.is_absolute() else folder / path)


def _metrics(client, op: dict, folder: Path | None, objects: dict) -> None:
    from mlflow.entities import Metric

    client.log_batch(op["run"], metrics=[Metric(k, v, ts, step) for k, v, ts, step in op["items"]])


def _params(client, op: dict, folder: Path | None, objects: dict) -> None:
    from mlflow.entities import Param

    client.log_batch(op["run"], params=[Param(k, v) for k, v in op["items"].items()])


def _tags(client, op: dict, folder: Path | None, objects: dict) -> None:
    from mlflow.entities import RunTag

    client.log_batch(op["run"], tags=[RunTag(k, v) for k, v in op["items"].items()])


def _artifact(client, op: dict, folder: Path | None, objects: dict) -> None:
    client.log_artifact(op["run"], _file(op, "path", folder), op.get("dest"))


def _artifacts(client, op: dict, folder: Path | None, objects: dict) -> None:
    client.log_artifacts(op["run"], _file(op, "path", folder), op.get("dest"))


def _end(client, op: dict, folder: Path | None, objects: dict) -> None:
    client.set_terminated(op["run"], op["status"])


def _finish(client, op: dict, folder: Path | None, objects: dict) -> None:
    client.call(finish_parent, client.client, op)


def _model(client, op: dict, folder: Path | None, objects: dict) -> None:
    example = objects.get("example")
    if example is None and op.get("example"):
        import numpy as np

        example = np.load(_file(op, "example", folder))
    log_model(client, op, _file(op, "path", folder), example)


APPLY: dict[str, Callable[..., None]] = {
    "metrics": _metrics,
    "params": _params,
    "tags": _tags,
    "artifact": _artifact,
    "artifacts": _artifacts,
    "model": _model,
    "end": _end,
    "finish": _finish,
}


def apply_op(client, op: dict, folder: Path | None = None, objects: dict | None = None) -> None:
    """Send one operation through `client` (a LockedClient); relative file paths are under `folder`."""
    APPLY[op["op"]](client, op, folder, objects or {})


def finish_parent(client, op: dict) -> None:
    """The parent's tags and status after a stage ended (`client`: an MlflowClient, under the lock):
    the stages that ran in this execution, whether it is partial, the error."""
    from mlflow.entities import RunTag

    stage, order, error, device = op["stage"], op["order"], op.get("error"), op["device"]
    run = client.get_run(op["run"])
    done = [s for s in run.data.tags.get("sharpkd.stages", "").split(",") if s]
    done.append(stage)
    done = sorted(set(done), key=lambda s: order.index(s) if s in order else len(order))
    skipped = [s for s in order if s not in done]
    note = f"Stages that ran in this execution: {', '.join(done)}."
    if skipped:
        note += (
            f" Not run here: {', '.join(skipped)} (unchanged, so DVC used its cache, or the pipeline stopped "
            "before them); their results come from earlier runs."
        )
    tags = {
        "sharpkd.stages": ",".join(done),
        "sharpkd.partial": str(bool(skipped)).lower(),
        "mlflow.note.content": note,
    }
    if device.startswith("cuda") or "device" not in run.data.tags:
        tags["device"] = device
    if error is not None:
        tags["error"] = f"{stage}: {error}"
    client.log_batch(op["run"], tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(op["run"], op["status"])


def log_model(client, op: dict, onnx_path: str, example: Any) -> None:
    """Log the ONNX student as an MLflow model of run op['run'] and register it as a new version of
    op['name'] (None: not registered), with the aliases and tags of tracking/registry.py."""
    import importlib

    from mlflow.models import Model

    from sharpkd.tracking.registry import tag_new_version

    # The flavor by name: serving runs the student through the deploy wing, which resolves
    # `models:/` URIs through this package; a module-level import would make the two depend on each other.
    serving = importlib.import_module(SERVING_FLAVOR)

    name = Path(onnx_path).stem
    # Created here so that it belongs to the run's experiment (log_model would use the fluent API's one).
    model = client.create_logged_model(op["experiment"], name, source_run_id=op["run"])
    info = client.call(
        _with_fluent_uri,
        client.store.uri,
        Model.log,
        None,  # artifact_path: deprecated, `name` replaces it
        name=name,
        flavor=serving,
        model_id=model.model_id,
        run_id=op["run"],
        registered_model_name=op["name"],
        onnx_path=onnx_path,
        example=example,
        tiling=tuple(op["tiling"]) if op.get("tiling") else None,
    )
    if op["name"] and info.registered_model_version is not None:
        version = str(info.registered_model_version)
        client.call(tag_new_version, client.client, op["name"], version, onnx_path, op["tags"])
        client.set_tag(op["run"], "sharpkd.registered_version", version)


def _with_fluent_uri(uri: str, fn: Callable, *args, **kwargs):
    """Call `fn` (an MLflow fluent-API function) against `uri`.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; it is put back so that a later
    resolve_store in this process still sees the user's setting.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return fn(*args, **kwargs)
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
