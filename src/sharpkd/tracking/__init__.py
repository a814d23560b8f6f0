"""MLflow wiring: the one place that talks to MLflow, split by job.

store.py (where runs go, the locked client), context.py (git state, execution key, dvc.yaml),
runs.py (NullTracker, the parent/child runs, stage_run), ops.py (what a tracker sends, as data),
outage.py (what a stage keeps while its store fails), plots.py (PNG plots), ui.py (sharpkd ui),
registry.py (the aliases export sets; `models:/` URIs resolved to a local ONNX file); `python -m
sharpkd.tracking` sends what stages kept during an outage.

Where runs go
    `tracking.uri` of params.yaml, else $MLFLOW_TRACKING_URI, else the embedded store
    sqlite:///<root>/mlflow.db with artifacts in <root>/mlartifacts (both git-ignored). <root> is
    $DVC_ROOT, which DVC sets to the main repository also for queued experiments that run in a
    copy under .dvc/tmp/exps, so every experiment writes to the repository's own store; without
    DVC it is the nearest folder up from the current one that holds dvc.yaml. A relative sqlite
    path is taken from <root>; the artifacts of any sqlite store live in `mlartifacts` beside the
    database file. `tracking.enabled: false` writes nothing (MLflow is not even imported); under
    torchrun only RANK 0 logs.
    The store follows its checkout: MLflow records absolute `file://` artifact locations, so when a
    SQLite store was copied or moved (`cp -a repo copy`), the locations under another folder's
    `mlartifacts` are rewritten to this one's when the store is opened (store.relocate_artifacts).
    An empty or non-SQLite database file is refused (MLflow would make it a new, empty store).

Servers and outages
    A tracking server must answer its /health page within 5 s when a stage starts, else the stage
    stops before any work with one line (how to run untracked included). The project's client
    gets short HTTP timeouts and few retries (store.HTTP_DEFAULTS) unless MLFLOW_HTTP_REQUEST_* are
    set. When the store fails later in a stage, the stage goes on and keeps the rest in an
    outbox under metrics/unlogged/, sent at its end or by the next stage that reaches the store
    (outage.py).

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
    A failed stage's run is FAILED (KILLED on Ctrl-C or SIGTERM) with the message in the tag `error`.
    A stage tags its run and the parent with its process (`sharpkd.process`: host:pid:start time);
    a run still RUNNING whose process is gone (kill -9, the OOM killer) is marked KILLED by the
    next stage that opens the store, or by `sharpkd ui`. Stages without outputs (check_params)
    open no run.

What is logged
    Tags (parent and child): git.commit, git.dirty, dvc.exp_name, data.source, teacher.source,
    device, sharpkd.stage (child). Params: the flattened params.yaml (dotted keys as in
    `dvc exp run -S`) on the parent; on a child the keys its dvc.yaml stage depends on.
    Metrics: what the stage logs; those logged without a step (final figures) are also copied to
    the parent so the runs table compares executions. None values are skipped. Artifacts: what
    the stage logs, plus the stage's DVC metrics and plots files (`dvc/`) and PNG renderings of
    its plots (`plots/`). `log_onnx_model` logs the ONNX student as an MLflow model that
    `mlflow models serve` serves (sharpkd.deploy.serving: image bytes in, PNG out; also the `onnx`
    flavor) and registers it as a new version of `tracking.registered_model`, moving the alias
    `challenger` to it (and `champion` while there is none; registry.py).

Concurrency
    SQLite has one writer at a time, and MLflow's read-then-write transactions fail with
    "database is locked" instead of waiting when two processes collide (e.g. `dvc queue start
    -j 2`). Every store call therefore holds an inter-process file lock (<db>.lock), which also
    covers the one-time creation of the tables, and retries with backoff if the database is
    still busy (the MLflow UI reads without the lock).
"""

from sharpkd.tracking.context import execution_key, param_text
from sharpkd.tracking.runs import MlflowTracker, NullTracker, Tracker, stage_run
from sharpkd.tracking.store import Store, project_root, resolve_store
from sharpkd.tracking.ui import ui_command

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "Store",
    "param_text",
    "execution_key",
    "project_root",
    "resolve_store",
    "stage_run",
    "ui_command",
]
