"""The runs: one parent per pipeline execution, one child per stage that ran (see tracking/__init__.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sharpkd.config import Params, flatten
from sharpkd.errors import UserError
from sharpkd.tracking.context import (
    chunks,
    describe_error,
    device_tag,
    dvc_stages,
    execution_key,
    git_state,
    numeric_only,
    param_text,
    stage_params,
    user_name,
)
from sharpkd.tracking.plots import render_plot
from sharpkd.tracking.store import LockedClient, resolve_store

_FLUSH_EVERY_S = 10.0  # step metrics are batched; the UI still sees training progress
_FLUSH_AT = 500


class NullTracker:
    """What a stage may record. Methods are no-ops when tracking is disabled."""

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None: ...

    def log_onnx_model(self, onnx_path: str | Path, input_example: Any) -> None: ...


class MlflowTracker(NullTracker):
    """The tracker of one stage: its child run, and the parent run of the execution."""

    def __init__(
        self,
        client: LockedClient,
        run_id: str,
        parent_id: str,
        registered_model: str,
        context_tags: dict,
        stages: dict[str, dict],
        experiment_id: str,
    ):
        self.client = client
        self.stages = stages
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.parent_id = parent_id
        self.registered_model = registered_model
        self.context_tags = context_tags
        self._pending: list = []
        self._flushed_at = time.monotonic()
        self.tags_set: dict[str, str] = {}

    # Metrics with a step (training curves) are batched; final figures go out at once, to both runs.
    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        values = numeric_only(metrics)
        if not values:
            return
        now = int(time.time() * 1000)
        if step is None:
            batch = [Metric(k, v, now, 0) for k, v in values.items()]
            for run_id in (self.run_id, self.parent_id):
                for part in chunks(batch, 1000):
                    self.client.log_batch(run_id, metrics=part)
            return
        self._pending += [Metric(k, v, now, int(step)) for k, v in values.items()]
        if len(self._pending) >= _FLUSH_AT or time.monotonic() - self._flushed_at > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for part in chunks(pending, 1000):
            self.client.log_batch(self.run_id, metrics=part)
        self._flushed_at = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_text(v)) for k, v in params.items() if v is not None]
        for part in chunks(items, 100):
            self.client.log_batch(self.run_id, params=part)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.tags_set.update({t.key: t.value for t in items})
        for run_id in (self.run_id, self.parent_id):
            for part in chunks(items, 100):
                self.client.log_batch(run_id, tags=part)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_onnx_model(self, onnx_path: str | Path, input_example: Any, register: bool = True) -> None:
        """Log the ONNX model as an MLflow model (input example, signature with dynamic sizes) and
        register it as a new version of tracking.registered_model."""
        import mlflow.onnx
        import numpy as np
        import onnx
        import onnxruntime as ort
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        example = np.asarray(input_example)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: example})

        def schema(nodes, arrays) -> Schema:
            # Symbolic ONNX dims (batch, height, width) become -1: any size is accepted.
            return Schema(
                [
                    TensorSpec(a.dtype, tuple(d if isinstance(d, int) else -1 for d in n.shape), n.name)
                    for n, a in zip(nodes, arrays, strict=True)
                ]
            )

        signature = ModelSignature(
            schema(session.get_inputs(), [example]), schema(session.get_outputs(), outputs)
        )
        name = Path(onnx_path).stem
        # Created here so that it belongs to the run's experiment (log_model would use the fluent
        # API's current one).
        model = self.client.create_logged_model(self.experiment_id, name, source_run_id=self.run_id)
        info = self.client.call(
            _with_fluent_uri,
            self.client.store.uri,
            mlflow.onnx.log_model,
            onnx.load(str(onnx_path)),
            name=name,
            model_id=model.model_id,
            input_example=example,
            signature=signature,
            # Explicit requirements: inferring them would load the model in a subprocess (seconds).
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            registered_model_name=self.registered_model if register else None,
            run_id=self.run_id,
        )
        if register and info.registered_model_version is not None:
            for key in ("git.commit", "dvc.exp_name"):
                if self.context_tags.get(key):
                    self.client.set_model_version_tag(
                        self.registered_model, str(info.registered_model_version), key, self.context_tags[key]
                    )
            self.client.set_tag(self.run_id, "sharpkd.registered_version", str(info.registered_model_version))

    def log_dvc_outputs(self, stage: str) -> None:
        """The stage's DVC metrics and plots files as artifacts, plus a PNG of each plot."""
        stages = self.stages
        sdef = stages.get(stage) or {}
        files = [next(iter(e)) if isinstance(e, dict) else e for e in (sdef.get("metrics") or [])]
        plots: list[tuple[str, str | None, list[str], str]] = []
        for e in sdef.get("plots") or []:
            path, opts = next(iter(e.items())) if isinstance(e, dict) else (e, None)
            files.append(path)
            if opts and opts.get("y"):
                ys = opts["y"] if isinstance(opts["y"], list) else [opts["y"]]
                plots.append((path, opts.get("x"), ys, opts.get("template", "linear")))
        mine = set(files)
        for e in (stages.get("__plots__") or {}).get("plots") or []:
            if not isinstance(e, dict):
                continue
            title, opts = next(iter(e.items()))
            if isinstance(opts, dict) and isinstance(opts.get("y"), dict):
                for path, ys in opts["y"].items():
                    if path in mine:
                        plots.append((path, opts.get("x"), ys if isinstance(ys, list) else [ys], title))
        for path in dict.fromkeys(files):
            if Path(path).is_file():
                self.log_artifact(path, "dvc")
        with tempfile.TemporaryDirectory() as tmp:
            for path, x, ys, name in plots:
                png = render_plot(Path(path), x, ys, name, Path(tmp))
                if png is not None:
                    self.log_artifact(png, "plots")


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


def _experiment_id(client: LockedClient, name: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(
                f"tracking: MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) "
                "or set tracking.experiment to another name"
            )
        return exp.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=artifact_root.as_uri() if artifact_root else None,
            # The MLflow UI then opens the experiment on its training runs, not the GenAI overview.
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except Exception:
        # Another process (a server store has no file lock) created it first.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


PROCESS_TAG = "sharpkd.process"


def process_tag() -> str:
    """`host:pid:start time` of this process: a later one can tell whether it still runs."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.0f}"


def _gone(tag: str) -> bool:
    """Whether the process named by a PROCESS_TAG value has ended (False when it cannot be told:
    another host, or a tag from elsewhere)."""
    import psutil

    try:
        host, pid, start = tag.rsplit(":", 2)
        pid, start = int(pid), float(start)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(pid).create_time() - start) > 1  # a new process with a reused pid
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def mark_orphans_killed(client: LockedClient, experiment_ids: list[str]) -> list[str]:
    """Runs left RUNNING by a stage process that no longer exists (kill -9, the OOM killer, a
    crash) are marked KILLED, with the reason in their `error` tag; returns their ids."""
    from mlflow.entities import RunTag

    found = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000)
    gone = [r for r in found if _gone(r.data.tags.get(PROCESS_TAG, ""))]
    for run in gone:
        pid = run.data.tags[PROCESS_TAG].rsplit(":", 2)[1]
        note = f"killed: process {pid} ended without closing this run (marked KILLED later)"
        client.log_batch(run.info.run_id, tags=[RunTag("error", note)])
        client.set_terminated(run.info.run_id, "KILLED")
    return [r.info.run_id for r in gone]


def _open(stage: str, params: Params) -> MlflowTracker:
    from mlflow.entities import Param

    store = resolve_store(params.tracking)
    try:
        client = LockedClient(store)
        exp_id = _experiment_id(client, params.tracking.experiment, store.artifact_root)
        mark_orphans_killed(client, [exp_id])  # before this stage looks for its parent
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"tracking: cannot use the MLflow store {store.uri}: {exc}; "
            "fix tracking.uri / MLFLOW_TRACKING_URI or set tracking.enabled: false"
        ) from None

    commit, dirty = git_state()
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    flat = flatten(params)
    common = {
        "git.commit": commit or "none",
        "git.dirty": str(dirty).lower(),
        "dvc.exp_name": exp_name,
        "data.source": params.data.source,
        "teacher.source": params.teacher.source,
        "mlflow.user": user_name(),
        "mlflow.source.type": "LOCAL",
    }
    if commit:
        common["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        common["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    key = execution_key()
    stages = dvc_stages()
    me = process_tag()

    def find_or_create_parent() -> str:
        quoted = key.replace("'", "\\'")
        found = client.client.search_runs(
            [exp_id],
            filter_string=f"tags.`sharpkd.execution` = '{quoted}' and tags.`sharpkd.role` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found and stage not in found[0].data.tags.get("sharpkd.stages", "").split(","):
            run_id = found[0].info.run_id
            client.client.set_tag(run_id, PROCESS_TAG, me)
            client.client.update_run(run_id, status="RUNNING")
            return run_id
        when = time.strftime("%Y%m%d-%H%M%S")
        name = exp_name or f"{commit[:7] or 'nogit'}{'-dirty' if dirty else ''}-{when}"
        params_hash = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
        tags = {
            **common,
            "sharpkd.role": "pipeline",
            "sharpkd.execution": key,
            "sharpkd.params_hash": params_hash,
            "sharpkd.stages": "",
            "mlflow.source.name": "dvc.yaml",
            PROCESS_TAG: me,
        }
        run = client.client.create_run(exp_id, run_name=name, tags=tags)
        items = [Param(k, param_text(v)) for k, v in flat.items()]
        for part in chunks(items, 100):
            client.client.log_batch(run.info.run_id, params=part)
        return run.info.run_id

    # One lock for the whole lookup-or-create: no second parent for the same execution.
    parent_id = client.call(find_or_create_parent)
    child = client.create_run(
        exp_id,
        run_name=stage,
        tags={
            **common,
            "mlflow.parentRunId": parent_id,
            "mlflow.source.name": f"stages/{stage}.py",
            "sharpkd.role": "stage",
            "sharpkd.stage": stage,
            "sharpkd.execution": key,
            PROCESS_TAG: me,
        },
    )
    tracker = MlflowTracker(
        client, child.info.run_id, parent_id, params.tracking.registered_model, common, stages, exp_id
    )
    tracker.log_params(stage_params(flat, stages.get(stage) or {}))
    return tracker


def _close(tracker: MlflowTracker, stage: str, status: str, error: str | None) -> None:
    from mlflow.entities import RunTag

    client = tracker.client
    tracker.flush()
    device = tracker.tags_set.get("device") or device_tag()
    child_tags = {"device": device}
    if error is not None:
        child_tags["error"] = error
    client.log_batch(tracker.run_id, tags=[RunTag(k, v) for k, v in child_tags.items()])
    client.set_terminated(tracker.run_id, status)

    def update_parent() -> None:
        run = client.client.get_run(tracker.parent_id)
        done = [s for s in run.data.tags.get("sharpkd.stages", "").split(",") if s]
        done.append(stage)
        # Stages that write nothing (check_params) are no part of an execution's results.
        order = [
            s
            for s, d in tracker.stages.items()
            if s != "__plots__" and any(d.get(k) for k in ("outs", "metrics", "plots"))
        ]
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
        client.client.log_batch(tracker.parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.client.set_terminated(tracker.parent_id, status)

    client.call(update_parent)


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[NullTracker]:
    """Open the stage's child run (and its execution's parent); close it FINISHED, FAILED or KILLED."""
    if not params.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield NullTracker()
        return
    tracker = _open(stage, params)
    status, error = "FINISHED", None
    try:
        yield tracker
        tracker.log_dvc_outputs(stage)
    except KeyboardInterrupt as exc:  # run_stage raises it for SIGINT and SIGTERM, named
        status, error = "KILLED", f"stopped by {exc}" if str(exc) else "interrupted"
        raise
    except SystemExit as exc:
        if exc.code not in (0, None):
            status, error = "FAILED", f"exit status {exc.code}"
        raise
    except BaseException as exc:
        status, error = "FAILED", describe_error(exc)
        raise
    finally:
        try:
            _close(tracker, stage, status, error)
        except Exception as exc:
            if status == "FINISHED":
                raise
            # Do not hide the stage's own error behind a tracking one.
            print(f"[{stage}] warning: could not record the failure in MLflow: {exc}", file=sys.stderr)
