"""MLflow wiring: the one place that talks to MLflow.

Where runs go
    `tracking.uri` of params.yaml, else $MLFLOW_TRACKING_URI, else the embedded store
    sqlite:///<root>/mlflow.db with artifacts in <root>/mlartifacts (both git-ignored). <root> is
    $DVC_ROOT, which DVC sets to the main repository also for queued experiments that run in a
    copy under .dvc/tmp/exps, so every experiment writes to the repository's own store; without
    DVC it is the nearest folder up from the current one that holds dvc.yaml. A relative sqlite
    path is taken from <root>; the artifacts of any sqlite store live in `mlartifacts` beside the
    database file. `tracking.enabled: false` writes nothing (MLflow is not even imported); under
    torchrun only RANK 0 logs.

Runs: one parent run per pipeline execution, one nested child run per stage that actually ran
    Each stage is its own process, so a stage finds its parent by an execution key (tag
    `sharpkd.execution`):
    - `exp:<name>` under `dvc exp run` (also queued ones): DVC sets DVC_EXP_NAME;
    - otherwise `dvc:<pid>:<start time>` of the `dvc repro` process that started the stage
      (found by walking up the process tree), so all stages of one `dvc repro` share a parent;
    - a stage started by hand (`python stages/x.py`) is an execution of its own.
    The newest parent with the stage's key is reused unless it already has a child for this
    stage (then this is a new execution and gets a new parent). A stage that DVC does not
    rerun (cached) runs no code and logs nothing. After each stage the parent's tag
    `sharpkd.stages` lists the stages that ran in it; when some stages of dvc.yaml did not run
    (a partial rerun, or an execution stopped by a failure) `sharpkd.partial` is "true" and the
    parent's description names the stages whose results come from earlier runs.
    Parent name: the DVC experiment name, else `<git rev>[-dirty]-<time>`. Its status is
    FINISHED after each stage that succeeded (the next stage reopens it), FAILED when one fails.
    A failed stage's run is FAILED (KILLED on Ctrl-C) with the message in the tag `error`.

What is logged
    Tags (parent and child): git.commit, git.dirty, dvc.exp_name, data.source, teacher.source,
    device, sharpkd.stage (child). Params: the flattened params.yaml (dotted keys as in
    `dvc exp run -S`) on the parent; on a child the keys its dvc.yaml stage depends on.
    Metrics: what the stage logs; those logged without a step (final figures) are also copied to
    the parent so the runs table compares executions. None values are skipped. Artifacts: what
    the stage logs, plus the stage's DVC metrics and plots files (`dvc/`) and PNG renderings of
    its plots (`plots/`). `log_onnx_model` logs an MLflow model (input example, signature) and
    registers it as a new version of `tracking.registered_model`.

Concurrency
    SQLite has one writer at a time, and MLflow's read-then-write transactions fail with
    "database is locked" instead of waiting when two processes collide (e.g. `dvc queue start
    -j 2`). Every store call therefore holds an inter-process file lock (<db>.lock), which also
    covers the one-time creation of the tables, and retries with backoff if the database is
    still busy (the MLflow UI reads without the lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from sharpkd.config import Params, TrackingParams, flatten
from sharpkd.errors import UserError

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_LOCK_TIMEOUT_S = 900  # a writer holds the lock for at most a few seconds (model logging)
_FLUSH_EVERY_S = 10.0  # step metrics are batched; the UI still sees training progress
_FLUSH_AT = 500


class StageTracker:
    """What a stage may record. Methods are no-ops when tracking is disabled."""

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None: ...

    def log_onnx_model(self, onnx_path: str | Path, input_example: Any) -> None: ...


# ----------------------------------------------------------------------------------------- store


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


def resolve_store(tp: TrackingParams, root: Path | None = None) -> Store:
    """The tracking store for these params (see the module docstring for the order)."""
    root = project_root() if root is None else Path(root)
    uri = tp.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_DB}"
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


class _Client:
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


# -------------------------------------------------------------------------------------- context


def _git(*args: str) -> str:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _git_state() -> tuple[str, bool]:
    """(commit, dirty) of the workspace the stage runs in.

    DVC itself edits dvc.lock and the .gitignore files beside outputs during a run: those do not count.
    """
    commit = _git("rev-parse", "HEAD")
    changed = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)dvc.lock",
        ":(exclude,glob)**/.gitignore",
    )
    dirty = bool(commit and changed)
    return commit, dirty


def execution_key() -> str:
    """What identifies the pipeline execution this stage belongs to (see the module docstring)."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return f"exp:{name}"
    import psutil

    me = psutil.Process()
    for proc in me.parents():
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
            return f"dvc:{proc.pid}:{proc.create_time():.0f}"
    return f"proc:{me.pid}:{me.create_time():.0f}"


def _dvc_stages(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, dict]:
    """The stages of dvc.yaml in pipeline order ({} when there is none)."""
    try:
        data = yaml.safe_load(dvc_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    stages = data.get("stages") or {}
    return {"__plots__": {"plots": data.get("plots") or []}, **stages} if stages else {}


def _param_text(value: Any) -> str:
    # The spelling `dvc exp run -S key=value` and params.yaml use: true, [70, 95], {}.
    return value if isinstance(value, str) else json.dumps(value)


def _stage_params(flat: dict[str, Any], stage_def: dict) -> dict[str, Any]:
    """The flattened params a dvc.yaml stage depends on (all of them when it lists none)."""
    names = [p for p in stage_def.get("params") or [] if isinstance(p, str)]
    if not names:
        return flat
    return {k: v for k, v in flat.items() if any(k == n or k.startswith(n + ".") for n in names)}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if v is not None and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _describe(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return text[:7000]


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ---------------------------------------------------------------------------------------- runs


class MlflowTracker(StageTracker):
    """The tracker of one stage: its child run, and the parent run of the execution."""

    def __init__(
        self,
        client: _Client,
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

        values = _numeric(metrics)
        if not values:
            return
        now = int(time.time() * 1000)
        if step is None:
            batch = [Metric(k, v, now, 0) for k, v in values.items()]
            for run_id in (self.run_id, self.parent_id):
                for part in _chunks(batch, 1000):
                    self.client.log_batch(run_id, metrics=part)
            return
        self._pending += [Metric(k, v, now, int(step)) for k, v in values.items()]
        if len(self._pending) >= _FLUSH_AT or time.monotonic() - self._flushed_at > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for part in _chunks(pending, 1000):
            self.client.log_batch(self.run_id, metrics=part)
        self._flushed_at = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_text(v)) for k, v in params.items() if v is not None]
        for part in _chunks(items, 100):
            self.client.log_batch(self.run_id, params=part)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.tags_set.update({t.key: t.value for t in items})
        for run_id in (self.run_id, self.parent_id):
            for part in _chunks(items, 100):
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
                png = _render_plot(Path(path), x, ys, name, Path(tmp))
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


def _render_plot(path: Path, x: str | None, ys: list[str], name: str, out_dir: Path) -> Path | None:
    if not path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    ys = [y for y in ys if y in df.columns]
    if not ys or (x is not None and x not in df.columns) or df.empty:
        return None
    scatter = name == "scatter"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for y in ys:
        d = df[[c for c in (x, y) if c]].dropna()
        xs = d[x] if x else d.index
        if scatter:
            ax.scatter(xs, d[y], label=y)
            labels = [c for c in df.columns if df[c].dtype == object]
            for i in d.index if labels else []:
                ax.annotate(str(df.at[i, labels[0]]), (xs[i], d.at[i, y]), fontsize=8)
        else:
            ax.plot(xs, d[y], label=y)
    ax.set_xlabel(x or "row")
    ax.set_title(f"{path.name}" if scatter or name == "linear" else f"{name} ({path.name})")
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend()
    stem = f"{path.stem}_{'_'.join(ys)}"
    out = out_dir / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)}.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _device_tag() -> str:
    # Only a stage that imported torch can have used a GPU.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


def _experiment_id(client: _Client, name: str, artifact_root: Path | None) -> str:
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


def _open(stage: str, params: Params) -> MlflowTracker:
    from mlflow.entities import Param

    store = resolve_store(params.tracking)
    try:
        client = _Client(store)
        exp_id = _experiment_id(client, params.tracking.experiment, store.artifact_root)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"tracking: cannot use the MLflow store {store.uri}: {exc}; "
            "fix tracking.uri / MLFLOW_TRACKING_URI or set tracking.enabled: false"
        ) from None

    commit, dirty = _git_state()
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    flat = flatten(params)
    common = {
        "git.commit": commit or "none",
        "git.dirty": str(dirty).lower(),
        "dvc.exp_name": exp_name,
        "data.source": params.data.source,
        "teacher.source": params.teacher.source,
        "mlflow.user": _user(),
        "mlflow.source.type": "LOCAL",
    }
    if commit:
        common["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        common["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    key = execution_key()
    stages = _dvc_stages()

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
        }
        run = client.client.create_run(exp_id, run_name=name, tags=tags)
        items = [Param(k, _param_text(v)) for k, v in flat.items()]
        for part in _chunks(items, 100):
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
        },
    )
    tracker = MlflowTracker(
        client, child.info.run_id, parent_id, params.tracking.registered_model, common, stages, exp_id
    )
    tracker.log_params(_stage_params(flat, stages.get(stage) or {}))
    return tracker


def _close(tracker: MlflowTracker, stage: str, status: str, error: str | None) -> None:
    from mlflow.entities import RunTag

    client = tracker.client
    tracker.flush()
    device = tracker.tags_set.get("device") or _device_tag()
    child_tags = {"device": device}
    if error is not None:
        child_tags["error"] = error
    client.log_batch(tracker.run_id, tags=[RunTag(k, v) for k, v in child_tags.items()])
    client.set_terminated(tracker.run_id, status)

    def update_parent() -> None:
        run = client.client.get_run(tracker.parent_id)
        done = [s for s in run.data.tags.get("sharpkd.stages", "").split(",") if s]
        done.append(stage)
        order = [s for s in tracker.stages if s != "__plots__"]
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
def stage_run(stage: str, params: Params) -> Iterator[StageTracker]:
    """Open the stage's child run (and its execution's parent); close it FINISHED, FAILED or KILLED."""
    if not params.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield StageTracker()
        return
    tracker = _open(stage, params)
    status, error = "FINISHED", None
    try:
        yield tracker
        tracker.log_dvc_outputs(stage)
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
        raise
    except SystemExit as exc:
        if exc.code not in (0, None):
            status, error = "FAILED", f"exit status {exc.code}"
        raise
    except BaseException as exc:
        status, error = "FAILED", _describe(exc)
        raise
    finally:
        try:
            _close(tracker, stage, status, error)
        except Exception as exc:
            if status == "FINISHED":
                raise
            # Do not hide the stage's own error behind a tracking one.
            print(f"[{stage}] warning: could not record the failure in MLflow: {exc}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- ui


def ui_command(port: int, params_path: str | Path = "params.yaml") -> tuple[list[str] | None, str]:
    """The `mlflow ui` command line for this project's store, and a line for the user.

    Returns (None, message) when the store is a tracking server: it has its own UI.
    """
    from sharpkd.config import load_params

    root = project_root()
    path = Path(params_path)
    path = path if path.is_absolute() else root / path
    tp = load_params(path).tracking if path.is_file() else TrackingParams()
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
    if not tp.enabled:
        note += "\nnote: tracking.enabled is false in params.yaml, so the pipeline records nothing new"
    return cmd, note
