"""The runs: one parent per pipeline execution, one child per stage that ran (see tracking/__init__.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from sharpkd.config import Params, flatten
from sharpkd.errors import UserError
from sharpkd.tracking.context import (
    PROCESS_TAG,
    chunks,
    describe_error,
    device_tag,
    dvc_stages,
    execution_key,
    git_state,
    gone,
    numeric_only,
    param_text,
    process_tag,
    stage_params,
    user_name,
)
from sharpkd.tracking.ops import apply_op
from sharpkd.tracking.outage import UNLOGGED, Outbox, send_kept, send_pending, short_reason, shown
from sharpkd.tracking.plots import render_plot
from sharpkd.tracking.store import (
    LockedClient,
    Store,
    check_reachable,
    project_root,
    resolve_store,
    unreachable,
)

_FLUSH_EVERY_S = 10.0  # step metrics are batched; the UI still sees training progress
_FLUSH_AT = 500


class Tracker(Protocol):
    """What a stage may record (the type of the tracker every stage receives, pipeline.StageFn)."""

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None: ...

    def log_onnx_model(self, onnx_path: str | Path, input_example: Any = None, **options: Any) -> None: ...


class NullTracker(Tracker):
    """A Tracker that records nothing (tracking disabled): the Protocol's methods, inherited, do nothing."""


class MlflowTracker(NullTracker):
    """The tracker of one stage: its child run, and the parent run of the execution.

    Every call goes through `_send`: when the store fails, the tracker goes offline and keeps the rest
    in an outbox (outage.py) instead of waiting on the store or failing the stage.
    """

    def __init__(
        self,
        client: LockedClient,
        stage: str,
        runs: tuple[str, str],
        registered_model: str,
        context_tags: dict,
        stages: dict[str, dict],
        experiment_id: str,
    ):
        self.client = client
        self.stage = stage
        self.stages = stages
        self.experiment_id = experiment_id
        self.run_id, self.parent_id = runs
        self.registered_model = registered_model
        self.context_tags = context_tags
        self._pending: list = []
        self._flushed_at = time.monotonic()
        self.tags_set: dict[str, str] = {}
        self.outbox: Outbox | None = None  # set when the store stopped answering
        self.lost: str | None = None  # why

    def _send(self, op: dict, **objects: Any) -> None:
        if self.outbox is None:
            try:
                apply_op(self.client, op, None, objects)
                return
            except Exception as exc:
                self._go_offline(exc)
        self.outbox.add(op, objects)

    def _go_offline(self, exc: Exception) -> None:
        store = self.client.store
        self.lost = short_reason(exc)
        root = project_root()
        folder = root / UNLOGGED / f"{self.stage}-{self.run_id}"
        header = {"store": store.uri, "stage": self.stage, "run": self.run_id, "parent": self.parent_id}
        self.outbox = Outbox(folder, {**header, "reason": self.lost})
        print(
            f"[{self.stage}] warning: tracking: {_where(store)} failed ({self.lost}); the stage goes on "
            f"and keeps what it cannot log in {shown(folder, root)}",
            file=sys.stderr,
        )

    # Metrics with a step (training curves) are batched; final figures go out at once, to both runs.
    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        values = numeric_only(metrics)
        if not values:
            return
        now = int(time.time() * 1000)
        if step is None:
            batch = [[k, v, now, 0] for k, v in values.items()]
            for run_id in (self.run_id, self.parent_id):
                for part in chunks(batch, 1000):
                    self._send({"op": "metrics", "run": run_id, "items": part})
            return
        self._pending += [[k, v, now, int(step)] for k, v in values.items()]
        if len(self._pending) >= _FLUSH_AT or time.monotonic() - self._flushed_at > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for part in chunks(pending, 1000):
            self._send({"op": "metrics", "run": self.run_id, "items": part})
        self._flushed_at = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, param_text(v)) for k, v in params.items() if v is not None]
        for part in chunks(items, 100):
            self._send({"op": "params", "run": self.run_id, "items": dict(part)})

    def set_tags(self, tags: dict[str, str]) -> None:
        items = {k: str(v) for k, v in tags.items()}
        self.tags_set.update(items)
        for run_id in (self.run_id, self.parent_id):
            for part in chunks(list(items.items()), 100):
                self._send({"op": "tags", "run": run_id, "items": dict(part)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(
            {"op": "artifact", "run": self.run_id, "path": str(Path(path).resolve()), "dest": artifact_path}
        )

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._send(
            {
                "op": "artifacts",
                "run": self.run_id,
                "path": str(Path(folder).resolve()),
                "dest": artifact_path,
            }
        )

    def log_onnx_model(
        self,
        onnx_path: str | Path,
        input_example: Any = None,
        register: bool = True,
        tiling: tuple[int, int] | None = None,
    ) -> None:
        """Log the ONNX student as an MLflow model that `mlflow models serve` serves (sharpkd.deploy.serving:
        image bytes in, PNG out; also the `onnx` flavor) and register it as a new version of
        tracking.registered_model, with the aliases of tracking/registry.py (ops.log_model)."""
        tags = {k: self.context_tags[k] for k in ("git.commit", "dvc.exp_name") if self.context_tags.get(k)}
        op = {
            "op": "model",
            "run": self.run_id,
            "experiment": self.experiment_id,
            "name": self.registered_model if register else None,
            "tags": tags,
            "path": str(Path(onnx_path).resolve()),
            "tiling": list(tiling) if tiling else None,
        }
        self._send(op, example=input_example)

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


def mark_orphans_killed(client: LockedClient, experiment_ids: list[str]) -> list[str]:
    """Runs left RUNNING by a stage process that no longer exists (kill -9, the OOM killer, a
    crash) are marked KILLED, with the reason in their `error` tag; returns their ids."""
    from mlflow.entities import RunTag

    found = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000)
    ended = [r for r in found if gone(r.data.tags.get(PROCESS_TAG, ""))]
    for run in ended:
        pid = run.data.tags[PROCESS_TAG].rsplit(":", 2)[1]
        note = f"killed: process {pid} ended without closing this run (marked KILLED later)"
        client.log_batch(run.info.run_id, tags=[RunTag("error", note)])
        client.set_terminated(run.info.run_id, "KILLED")
    return [r.info.run_id for r in ended]


def _open(stage: str, params: Params) -> MlflowTracker:
    """The stage's tracker; UserError, within seconds, when the store cannot be used."""
    store = resolve_store(params.tracking)
    check_reachable(store)
    try:
        client = LockedClient(store)
        for note in send_pending(client, project_root()):  # what stages kept during an outage
            print(f"[{stage}] {note}", file=sys.stderr)
        exp_id = _experiment_id(client, params.tracking.experiment, store.artifact_root)
        mark_orphans_killed(client, [exp_id])  # before this stage looks for its parent
        return _start_runs(client, stage, params, exp_id)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"tracking: cannot use {_where(store)} ({short_reason(exc)}); "
            "fix tracking.uri / MLFLOW_TRACKING_URI or set tracking.enabled: false"
        ) from None


def _start_runs(client: LockedClient, stage: str, params: Params, exp_id: str) -> MlflowTracker:
    """The stage's child run, under its execution's parent (found or created)."""
    from mlflow.entities import Param

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
    runs = (child.info.run_id, parent_id)
    tracker = MlflowTracker(client, stage, runs, params.tracking.registered_model, common, stages, exp_id)
    tracker.log_params(stage_params(flat, stages.get(stage) or {}))
    return tracker


def _close(tracker: MlflowTracker, stage: str, status: str, error: str | None) -> None:
    tracker.flush()
    device = tracker.tags_set.get("device") or device_tag()
    child_tags = {"device": device} | ({} if error is None else {"error": error})
    tracker._send({"op": "tags", "run": tracker.run_id, "items": child_tags})
    tracker._send({"op": "end", "run": tracker.run_id, "status": status})
    # Stages that write nothing (check_params) are no part of an execution's results.
    order = [
        s
        for s, d in tracker.stages.items()
        if s != "__plots__" and any(d.get(k) for k in ("outs", "metrics", "plots"))
    ]
    finish = {"op": "finish", "run": tracker.parent_id, "stage": stage, "order": order}
    tracker._send(finish | {"status": status, "error": error, "device": device})


def _after_outage(tracker: MlflowTracker) -> None:
    """At the end of a stage that lost its store: try it once more, else say in one line where what
    it could not log is kept. The stage's own outcome (its outputs, its exit status) stands."""
    store, folder, root = tracker.client.store, tracker.outbox.folder, project_root()
    why = unreachable(store)
    if why is None:
        try:
            refused = send_kept(tracker.client, folder)
            extra = f" ({len(refused)} refused: {'; '.join(refused)})" if refused else ""
            print(
                f"[{tracker.stage}] tracking: {_where(store)} answers again; all is logged{extra}",
                file=sys.stderr,
            )
            return
        except Exception as exc:
            why = short_reason(exc)
    print(
        f"[{tracker.stage}] warning: tracking: {_where(store)} still fails ({why}); the stage's outputs are "
        f"written but its MLflow run {tracker.run_id} is incomplete: what it could not log is kept in "
        f"{shown(folder, root)} and sent by the next stage that reaches the store, or by "
        "`python -m sharpkd.tracking`",
        file=sys.stderr,
    )


def _where(store: Store) -> str:
    return f"the MLflow {'server' if store.is_server else 'store'} {store.uri}"


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
        if tracker.outbox is not None:
            _after_outage(tracker)
