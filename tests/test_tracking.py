"""MLflow tracking (src/sharpkd/tracking.py): store resolution, run grouping, failures, a tracking
server, concurrent writers, and real DVC pipelines (`dvc repro`, queued experiments run two at a
time) recorded in a real SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from helpers import REPO, TINY, deep_update, git_repo_copy, repo_params_dict, tiny_params
from sharpkd import tracking
from sharpkd.config import flatten, params_from_dict
from sharpkd.errors import UserError
from sharpkd.pipeline import run_stage

VENV_BIN = Path(sys.executable).parent
STAGES = ["download", "degrade", "teacher", "cache_teacher", "distill", "evaluate", "export"]
# Tracking on; no LPIPS download (no internet in tests); one timing repeat.
E2E = {
    "tracking": {"enabled": True},
    "eval": {"lpips": False, "speed_repeats": 1, "teacher_speed_repeats": 0},
    "export": {"speed_repeats": 1},
}
EXPERIMENTS = {"exp-lr": ("distill.lr", 0.004), "exp-wide": ("student.channels", 12)}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without DVC/MLflow settings, offline, with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_")) and k != "RANK"}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, limit_s: float = 240) -> None:
    """Poll `url` until it answers 200 (the server takes seconds to start on a busy 2-core machine)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {limit_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def param_texts(params) -> dict[str, str]:
    return {k: tracking.param_text(v) for k, v in flatten(params).items()}


def runs_of(client: MlflowClient, filter_string: str = "") -> list:
    exp = client.get_experiment_by_name("sharpkd")
    return client.search_runs([exp.experiment_id], filter_string, max_results=1000) if exp else []


def children(client: MlflowClient, parent_id: str) -> dict:
    return {r.info.run_name: r for r in runs_of(client, f"tags.mlflow.parentRunId = '{parent_id}'")}


# --------------------------------------------------------------------------- in-process, small


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An initialised empty store: creating MLflow's tables takes seconds, copying the file does not."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, template_db) -> Path:
    """A folder that looks like the project root (dvc.yaml), with a ready store, and no DVC/MLflow env."""
    for key in list(os.environ):
        if key.startswith(("DVC_", "MLFLOW_")) or key == "RANK":
            monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # log_model goes through MLflow's fluent API, which keeps the URI in a module global.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return tmp_path


def on() -> object:
    return tiny_params(tracking={"enabled": True})


def test_store_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    tp = on().tracking
    store = tracking.resolve_store(tp)
    assert store.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert store.artifact_root == tmp_path / "mlartifacts"
    assert store.lock_path == tmp_path / "mlflow.db.lock"
    # A queued experiment's copy of the repository writes to the repository's own store.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12"))
    assert tracking.resolve_store(tp).uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    server = tracking.resolve_store(tp)
    assert (server.uri, server.artifact_root, server.lock_path) == ("http://127.0.0.1:5999", None, None)
    # params.yaml wins over the environment; a relative sqlite path is taken from the root.
    local = tracking.resolve_store(
        tiny_params(tracking={"enabled": True, "uri": "sqlite:///runs/t.db"}).tracking
    )
    assert local.uri == f"sqlite:///{tmp_path}/runs/t.db"
    assert local.artifact_root == tmp_path / "runs" / "mlartifacts"
    with pytest.raises(UserError, match="sqlite://runs.db"):
        tracking.resolve_store(tiny_params(tracking={"uri": "sqlite://runs.db"}).tracking)


def test_stages_of_one_execution_share_a_parent(workdir, monkeypatch):
    params = on()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")
    with tracking.stage_run("download", params) as t:
        t.log_metrics({"download.train_images": 5, "download.skipped": None})
        for step in (1, 2, 3):
            t.log_metrics({"train.loss": 1.0 / step, "train.val_psnr": None}, step=step)
        t.set_tags({"device": "cpu-test"})
        (workdir / "note.txt").write_text("hello")
        t.log_artifact(workdir / "note.txt", "notes")
    with tracking.stage_run("degrade", params) as t:
        t.log_metrics({"degrade.train_patches": 30})

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert client.get_experiment_by_name("sharpkd").artifact_location == (workdir / "mlartifacts").as_uri()
    (parent,) = runs_of(client, "tags.`sharpkd.role` = 'pipeline'")
    assert parent.info.run_name == "exp-one" and parent.info.status == "FINISHED"
    assert parent.data.params == param_texts(params)
    assert parent.data.tags["sharpkd.stages"] == "download,degrade"
    assert parent.data.tags["sharpkd.partial"] == "true"  # teacher..export did not run here
    assert "teacher" in parent.data.tags["mlflow.note.content"]
    # Final figures are copied to the parent (runs table); curves stay on the stage's run.
    assert parent.data.metrics == {"download.train_images": 5.0, "degrade.train_patches": 30.0}

    kids = children(client, parent.info.run_id)
    assert set(kids) == {"download", "degrade"}
    dl = kids["download"]
    assert dl.info.status == "FINISHED"
    assert dl.data.metrics["download.train_images"] == 5.0
    assert "download.skipped" not in dl.data.metrics and "train.val_psnr" not in dl.data.metrics
    history = client.get_metric_history(dl.info.run_id, "train.loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    tags = dl.data.tags
    assert tags["sharpkd.stage"] == "download" and tags["dvc.exp_name"] == "exp-one"
    assert tags["data.source"] == "samples" and tags["teacher.source"] == "train"
    assert tags["device"] == "cpu-test" and tags["git.dirty"] in ("true", "false") and tags["git.commit"]
    # A child carries the params its dvc.yaml stage depends on.
    assert dl.data.params["data.source"] == "samples" and "distill.lr" not in dl.data.params
    assert [a.path for a in client.list_artifacts(dl.info.run_id, "notes")] == ["notes/note.txt"]

    # The same stage again under the same experiment name is a new execution: a new parent.
    with tracking.stage_run("download", params):
        pass
    assert len(runs_of(client, "tags.`sharpkd.role` = 'pipeline'")) == 2


def test_tracking_disabled_writes_nothing(workdir, monkeypatch):
    (workdir / "mlflow.db").unlink()
    off = tiny_params(tracking={"enabled": False})
    with tracking.stage_run("download", off) as t:
        t.log_metrics({"a": 1.0})
        t.log_artifact(workdir / "dvc.yaml")
    # Under torchrun only rank 0 logs.
    monkeypatch.setenv("RANK", "1")
    with tracking.stage_run("distill", on()) as t:
        t.log_metrics({"a": 1.0}, step=1)
    assert type(t) is tracking.NullTracker
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()


def test_failed_stage_is_marked_failed_with_the_message(workdir, capsys):
    params_path = workdir / "params.yaml"
    params_path.write_text(yaml.safe_dump(deep_update(deep_update(repo_params_dict(), TINY), E2E)))

    def bad_input(params, paths, tracker):
        tracker.log_metrics({"teacher.params": 10})
        raise UserError("teacher: /nowhere/x.pth not found")

    with pytest.raises(SystemExit) as exc:
        run_stage("teacher", bad_input, params_path=str(params_path))
    assert exc.value.code == 1
    assert "/nowhere/x.pth not found" in capsys.readouterr().err

    def crash(params, paths, tracker):
        raise RuntimeError("out of cheese")

    with pytest.raises(RuntimeError, match="out of cheese"):
        run_stage("distill", crash, params_path=str(params_path))

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    stage_runs = {r.info.run_name: r for r in runs_of(client, "tags.`sharpkd.role` = 'stage'")}
    teacher, distill = stage_runs["teacher"], stage_runs["distill"]
    assert teacher.info.status == "FAILED"
    assert teacher.data.tags["error"] == "teacher: /nowhere/x.pth not found"
    assert teacher.data.metrics == {"teacher.params": 10.0}  # what it logged before failing stays
    assert distill.info.status == "FAILED" and distill.data.tags["error"] == "RuntimeError: out of cheese"
    parent = client.get_run(distill.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED" and parent.data.tags["error"].startswith("distill: RuntimeError")


# --------------------------------------------------------------------------- the store's own files


def artifact_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def log_note(text: str, onnx: Path | None = None) -> str:
    """An export stage run in the current folder that logs a note (and registers `onnx`); its run id."""
    Path("note.txt").write_text(text)
    with tracking.stage_run("export", on()) as t:
        t.log_artifact("note.txt", "notes")
        if onnx is not None:
            t.log_onnx_model(onnx)
    return t.run_id


def test_a_copied_or_moved_checkout_keeps_its_artifacts_to_itself(workdir, monkeypatch, tmp_path_factory):
    """`cp -a repo copy`, then a stage in the copy: its artifacts and model go to copy/mlartifacts, not
    the original's; a moved checkout writes nothing where it was and still reads its old runs."""
    from mlflow.artifacts import download_artifacts

    from sharpkd.models.student import Student
    from sharpkd.onnx_export import export_onnx
    from sharpkd.tracking.registry import fetch_model

    onnx = export_onnx(Student(scale=2, channels=8, blocks=1).eval(), workdir / "student.onnx")
    first = log_note("original", onnx)
    original = artifact_files(workdir / "mlartifacts")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    copy, moved = elsewhere / "copy", elsewhere / "moved"
    subprocess.run(["cp", "-a", str(workdir), str(copy)], check=True)
    monkeypatch.chdir(copy)
    second = log_note("copy", copy / "student.onnx")
    assert artifact_files(workdir / "mlartifacts") == original, "the copy wrote into the original"
    assert (copy / "mlartifacts" / second / "artifacts" / "notes" / "note.txt").read_text() == "copy"
    client = MlflowClient(f"sqlite:///{copy}/mlflow.db")
    root = (copy / "mlartifacts").as_uri()
    assert client.get_experiment_by_name("sharpkd").artifact_location == root
    assert all(r.info.artifact_uri.startswith(root + "/") for r in runs_of(client))
    stored = [client.get_model_version_download_uri("sharpkd-student", v) for v in ("1", "2")]
    assert all(uri.startswith(root + "/models/") for uri in stored), stored

    # The original is moved: nothing is written where it was, its old runs and model are read from it.
    subprocess.run(["mv", str(workdir), str(moved)], check=True)
    monkeypatch.chdir(moved)
    third = log_note("moved")
    assert not workdir.exists()
    client = MlflowClient(f"sqlite:///{moved}/mlflow.db")
    notes = {
        run_id: Path(
            download_artifacts(
                run_id=run_id,
                artifact_path="notes/note.txt",
                dst_path=str(elsewhere / run_id),
                tracking_uri=client.tracking_uri,
            )
        ).read_text()
        for run_id in (first, third)
    }
    assert notes == {first: "original", third: "moved"}
    monkeypatch.setenv("SHARPKD_MODELS_DIR", str(elsewhere / "cache"))
    fetched = fetch_model("models:/sharpkd-student/1", tracking.resolve_store(on().tracking))
    assert fetched.read_bytes() == (moved / "student.onnx").read_bytes()


A_STAGE = """
from pathlib import Path
from sharpkd.pipeline import run_stage
run_stage("export", lambda params, paths, tracker: Path("ran").touch())
"""


@pytest.mark.parametrize("content", [b"", b"<html>not a database</html>\n"], ids=["empty", "corrupt"])
def test_an_empty_or_corrupt_store_is_refused_not_replaced(workdir, monkeypatch, content):
    """A zero-byte (or foreign) mlflow.db beside an mlartifacts/ of old runs: a stage, `sharpkd ui` and
    a `models:/` lookup stop with one line naming the file and what to do; the file is left as it is
    (MLflow would silently make it a new, empty store)."""
    from sharpkd.tracking.registry import fetch_model

    params_path = workdir / "params.yaml"
    params_path.write_text(yaml.safe_dump(deep_update(deep_update(repo_params_dict(), TINY), E2E)))
    log_note("an old run")
    db = workdir / "mlflow.db"
    db.write_bytes(content)
    res = subprocess.run(
        [sys.executable, "-c", A_STAGE],
        cwd=workdir,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1 and not (workdir / "ran").exists(), res.stderr[-3000:]
    (line,) = res.stderr.strip().splitlines()
    what = "is not an SQLite database (corrupt)" if content else "is empty (0 bytes)"
    assert line == (
        f"error [export]: tracking: the MLflow store {db} {what}; restore it from a backup, or move it and "
        f"{workdir / 'mlartifacts'}/ aside to start a new store (or set tracking.enabled: false)"
    )
    with pytest.raises(UserError, match=r"mlflow\.db (is empty|is not an SQLite)"):
        tracking.ui_command(5000)
    monkeypatch.setenv("SHARPKD_MODELS_DIR", str(workdir / "cache"))
    with pytest.raises(UserError, match=r"mlflow\.db (is empty|is not an SQLite)"):
        fetch_model("models:/sharpkd-student/1")
    assert db.read_bytes() == content


# --------------------------------------------------------------------------- killed stages

HOLDER = """
import sys, time
from helpers import tiny_params
from sharpkd import tracking
with tracking.stage_run(sys.argv[1], tiny_params(tracking={"enabled": True})):
    print("open", flush=True)
    time.sleep(600)
"""


def _open_then_kill(workdir: Path, stage: str, exp_name: str) -> None:
    """A stage process that opens its run and is then killed with SIGKILL (no cleanup can run)."""
    env = clean_env(PYTHONPATH=str(REPO / "tests"), DVC_EXP_NAME=exp_name)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, stage], cwd=workdir, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "open"
    finally:
        proc.kill()
        proc.wait()


def test_runs_of_a_killed_stage_are_marked_killed_by_the_next_stage_or_the_ui(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    _open_then_kill(workdir, "distill", "killed-one")
    (parent,) = runs_of(client, "attributes.run_name = 'killed-one'")
    (child,) = children(client, parent.info.run_id).values()
    assert (parent.info.status, child.info.status) == ("RUNNING", "RUNNING")  # what kill -9 leaves

    with tracking.stage_run("export", on()):  # the next stage, in another execution
        pass
    for run in (child, parent):
        run = client.get_run(run.info.run_id)
        assert run.info.status == "KILLED" and "ended without closing this run" in run.data.tags["error"]

    _open_then_kill(workdir, "evaluate", "killed-two")
    cmd, note = tracking.ui_command(5000)
    assert cmd is not None and "2 run(s) left RUNNING by a killed stage are now marked KILLED" in note
    assert not runs_of(client, "attributes.status = 'RUNNING'")


STOPPED_STAGE = """
import sys, time
from sharpkd.files import atomic_dir
from sharpkd.pipeline import run_stage

def run(params, paths, tracker):
    with atomic_dir("data/out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        print("working", flush=True)
        try:
            time.sleep(600)
        except KeyboardInterrupt:
            if sys.argv[1] != "swallow":
                raise
            # What a SQLAlchemy callback once did with a Ctrl-C: the stage went on to the end.

run_stage("distill", run)
"""


@pytest.mark.parametrize(("mode", "sig", "status"), [("raise", "SIGTERM", 143), ("swallow", "SIGINT", 130)])
def test_a_signalled_stage_fails_and_its_run_is_killed(workdir, mode, sig, status):
    import signal

    params_path = workdir / "params.yaml"
    params_path.write_text(yaml.safe_dump(deep_update(deep_update(repo_params_dict(), TINY), E2E)))
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPED_STAGE, mode],
        cwd=workdir,
        env=clean_env(DVC_EXP_NAME=f"stopped-{mode}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    assert "[distill] " in err and "did not finish" in err and "Traceback" not in err
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (parent,) = runs_of(client, f"attributes.run_name = 'stopped-{mode}'")
    (child,) = children(client, parent.info.run_id).values()
    assert child.info.status == "KILLED" and child.data.tags["error"] == f"stopped by {sig}"
    assert parent.info.status == "KILLED"
    leftovers = [p.name for p in (workdir / "data").iterdir() if p.name != "out"]
    assert leftovers == [], "a temporary folder was left behind"


# --------------------------------------------------------------------------- tracking server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, template_db):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    root = tmp_path_factory.mktemp("server")
    shutil.copy(template_db, root / "server.db")
    port = free_port()
    proc = start_mlflow_server(root / "server.db", port)
    try:
        yield f"http://127.0.0.1:{port}", root
    finally:
        stop(proc)


def start_mlflow_server(db: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` over the SQLite store `db`, artifacts in `artifacts/` beside
    it, in a session of its own (stop() or os.killpg end it); returns once it answers."""
    folder = db.parent
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
    cmd += ["--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    with open(folder / "server.log", "a") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=folder,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


@pytest.mark.parametrize("how", ["env", "params"])
def test_tracking_server_uri_override(workdir, monkeypatch, mlflow_server, how):
    import torch

    from sharpkd.models.student import Student
    from sharpkd.onnx_export import export_onnx

    torch.set_num_threads(1)
    uri, server_root = mlflow_server
    (workdir / "mlflow.db").unlink()
    if how == "env":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        params = on()
    else:
        # params.yaml wins over the environment.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/elsewhere.db")
        params = tiny_params(tracking={"enabled": True, "uri": uri})
    monkeypatch.setenv("DVC_EXP_NAME", f"server-{how}")
    onnx_path = export_onnx(Student(scale=2, channels=8, blocks=1).eval(), workdir / "student.onnx")
    (workdir / "model_card.md").write_text("# card\n")
    with tracking.stage_run("export", params) as t:
        t.log_metrics({"export.params": 123})
        t.log_artifact(workdir / "model_card.md")
        t.log_onnx_model(onnx_path, np.zeros((1, 3, 16, 16), np.float32))

    client = MlflowClient(uri)
    (parent,) = runs_of(client, f"attributes.run_name = 'server-{how}'")
    (child,) = children(client, parent.info.run_id).values()
    assert child.data.metrics["export.params"] == 123.0
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["model_card.md"]
    versions = client.search_model_versions("name = 'sharpkd-student'")
    assert child.info.run_id in {v.run_id for v in versions}
    # Artifacts went through the server into its folder; nothing was written locally.
    assert list((server_root / "artifacts").rglob("model_card.md"))
    assert not any(workdir.glob("*.db")) and not (workdir / "mlartifacts").exists()


def test_registered_students_resolve_through_a_tracking_server(workdir, monkeypatch, mlflow_server):
    """`--model models:/...` with MLFLOW_TRACKING_URI at a server: the ONNX file comes through it."""
    from sharpkd.deploy.models import resolve_model
    from sharpkd.models.student import Student
    from sharpkd.onnx_export import export_onnx

    uri, _ = mlflow_server
    (workdir / "mlflow.db").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SHARPKD_MODELS_DIR", str(workdir / "cache"))
    student = Student(scale=2, channels=8, blocks=1).eval()
    onnx_path = export_onnx(student, workdir / "student.onnx")
    with tracking.stage_run("export", on()) as t:
        t.log_onnx_model(onnx_path)
    version = MlflowClient(uri).get_registered_model("sharpkd-student").aliases["challenger"]
    for spec in ("models:/sharpkd-student@challenger", f"models:/sharpkd-student/{version}"):
        path, _ = resolve_model(spec)
        assert path.read_bytes() == onnx_path.read_bytes(), spec
        assert path.parent == workdir / "cache" / "sharpkd-student" / str(version)
    assert not any(workdir.glob("*.db")), "nothing is written to a local store"


# --------------------------------------------------------------------------- concurrent writers

WRITER = """
import os, sys, time
from helpers import tiny_params
from sharpkd import tracking
go = sys.argv[1]
params = tiny_params(tracking={"enabled": True})
while not os.path.exists(go):
    time.sleep(0.01)
with tracking.stage_run("distill", params) as t:
    for i in range(40):
        t.log_metrics({"final.i": i})  # one write per call, to the stage run and its parent
        t.log_metrics({"train.loss": 1.0 / (i + 1)}, step=i)
        t.flush()
        t.set_tags({"last": str(i)})
"""


def test_concurrent_writers_keep_the_store_intact(tmp_path):
    """Two stage processes start at the same moment on a store that does not exist yet."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "writer.py").write_text(WRITER)
    go = tmp_path / "go"
    env = clean_env(PYTHONPATH=str(REPO / "tests"))
    procs = [
        subprocess.Popen(
            [sys.executable, "writer.py", str(go)],
            cwd=tmp_path,
            env={**env, "DVC_EXP_NAME": name},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("writer-a", "writer-b")
    ]
    time.sleep(3)  # both have imported MLflow and wait for the signal
    go.touch()
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = runs_of(client, "tags.`sharpkd.role` = 'pipeline'")
    assert sorted(r.info.run_name for r in parents) == ["writer-a", "writer-b"]
    for parent in parents:
        (child,) = children(client, parent.info.run_id).values()
        assert child.info.status == "FINISHED" and child.data.tags["last"] == "39"
        assert len(client.get_metric_history(child.info.run_id, "final.i")) == 40
        assert len(client.get_metric_history(parent.info.run_id, "final.i")) == 40
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train.loss")] == list(range(40))


# --------------------------------------------------------------------------- real DVC pipelines

_PIPELINE: dict = {}


def dvc(repo: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["dvc", *args],
        cwd=repo,
        env=clean_env(DVC_SITE_CACHE_DIR=str(repo.parent / "dvc-site")),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def pipeline_repo(tmp_path_factory) -> Path:
    """A copy of this repository with the tiny profile and tracking on, after `dvc repro` and two
    experiments queued and run two at a time (`dvc queue start -j 2`). Built once per session (the
    browser test uses it too)."""
    if "repo" in _PIPELINE:
        return _PIPELINE["repo"]
    if "error" in _PIPELINE:
        pytest.fail(_PIPELINE["error"])
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        params = deep_update(deep_update(repo_params_dict(), TINY), E2E)
        repo = git_repo_copy(tmp_path_factory.mktemp("pipeline") / "repo", params, clean_env())
        dvc(repo, "repro")  # what `make run` does
        for name, (key, value) in EXPERIMENTS.items():
            dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"{key}={value}")
        dvc(repo, "queue", "start", "-j", "2")
        deadline = time.monotonic() + 900
        while True:
            status = dvc(repo, "queue", "status").stdout
            if not any(s in status for s in ("Queued", "Running")) or time.monotonic() > deadline:
                break
            time.sleep(2)
        for name in EXPERIMENTS:
            line = next((ln for ln in status.splitlines() if f" {name} " in f" {ln} "), "")
            if "Success" not in line:
                logs = dvc(repo, "queue", "logs", name, check=False)
                raise AssertionError(f"experiment {name}: {line or status}\n{logs.stdout[-4000:]}")
    except BaseException as exc:
        _PIPELINE["error"] = f"building the pipeline repository failed: {exc}"
        raise
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    _PIPELINE["parents"] = {r.info.run_id for r in runs_of(client, "tags.`sharpkd.role` = 'pipeline'")}
    _PIPELINE["repo"] = repo
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return pipeline_repo(tmp_path_factory)


def exp_show(repo: Path) -> dict[str, dict]:
    """name -> {'params': params.yaml data, 'eval': metrics/eval.json data} of each experiment."""
    out = {}
    for entry in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for exp in entry.get("experiments") or []:
            rev = exp["revs"][0]
            data = rev["data"]
            out[rev["name"]] = {
                "params": data["params"]["params.yaml"]["data"],
                "eval": data["metrics"]["metrics/eval.json"]["data"],
            }
    return out


def numeric(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@pytest.mark.slow
def test_pipeline_and_queued_experiments_are_tracked(repo):
    from mlflow.models import Model

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("sharpkd")
    assert exp.artifact_location == (repo / "mlartifacts").as_uri()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()

    parents = {
        r.info.run_name: r
        for r in runs_of(client, "tags.`sharpkd.role` = 'pipeline'")
        if r.info.run_id in _PIPELINE["parents"]  # not the reruns of the next test
    }
    baseline_name = next(n for n, r in parents.items() if r.data.tags["dvc.exp_name"] == "")
    assert set(parents) == {baseline_name, *EXPERIMENTS}, "one parent per execution"
    assert baseline_name.startswith(head[:7] + "-")

    shown = exp_show(repo)
    expected = {
        baseline_name: (
            yaml.safe_load((repo / "params.yaml").read_text()),
            json.loads((repo / "metrics/eval.json").read_text()),
        ),
        **{name: (shown[name]["params"], shown[name]["eval"]) for name in EXPERIMENTS},
    }
    versions = {v.run_id: v for v in client.search_model_versions("name = 'sharpkd-student'")}
    for name, parent in parents.items():
        raw_params, eval_json = expected[name]
        assert parent.info.status == "FINISHED", name
        assert parent.data.params == param_texts(params_from_dict(raw_params)), name
        kids = children(client, parent.info.run_id)
        assert list(parent.data.tags["sharpkd.stages"].split(",")) == [s for s in STAGES if s in kids]
        if name == baseline_name:
            assert set(kids) == set(STAGES) and parent.data.tags["sharpkd.partial"] == "false"
            assert parent.data.tags["git.dirty"] == "false"
        else:
            # Stages before distill came from DVC's run cache: they ran (and logged) nothing here.
            assert set(kids) == {"distill", "evaluate", "export"}, name
            assert parent.data.tags["sharpkd.partial"] == "true"
            assert parent.data.tags["git.dirty"] == "true"  # params differ from the commit
        for stage, run in kids.items():
            assert run.info.status == "FINISHED", (name, stage)
            tags = run.data.tags
            assert tags["sharpkd.stage"] == stage and tags["git.commit"] == head
            assert tags["dvc.exp_name"] == ("" if name == baseline_name else name)
            assert tags["data.source"] == "samples" and tags["teacher.source"] == "train" and tags["device"]

        # Evaluation metrics: the same numbers as metrics/eval.json, on the stage run and the parent.
        want = numeric(eval_json)
        evaluate = kids["evaluate"]
        assert {k: evaluate.data.metrics.get(k) for k in want} == want, name
        assert {k: parent.data.metrics.get(k) for k in want} == want, name
        assert any(k.startswith("train.") for k in kids["distill"].data.metrics)
        assert len(client.get_metric_history(kids["distill"].info.run_id, "train.loss")) > 1
        assert any(k.startswith("export.") for k in parent.data.metrics)

        # Artifacts: comparison images, plots, model card, DVC metrics files, the ONNX model.
        def listed(run, path):
            return [Path(a.path).name for a in client.list_artifacts(run.info.run_id, path)]

        assert any(n.endswith(".png") for n in listed(evaluate, "compare"))
        assert "eval.json" in listed(evaluate, "dvc")
        assert "train_curve_loss.png" in listed(kids["distill"], "plots")
        export = kids["export"]
        assert "model_card.md" in listed(export, None)
        (model,) = client.search_logged_models(
            [exp.experiment_id], filter_string=f"source_run_id = '{export.info.run_id}'"
        )
        info = Model.load(Path(urlparse(model.artifact_location).path) / "MLmodel")
        # Servable (sharpkd.deploy.serving: image bytes in, PNG out; tests/test_registry.py) and still ONNX.
        assert {"onnx", "python_function"} <= set(info.flavors)
        assert info.signature.inputs.input_names() == ["image"]
        assert info.saved_input_example_info["type"] == "dataframe"
        assert export.info.run_id in versions, f"{name}: the student is registered from its export run"

    assert len(versions) == 3, "a new version of the registered student per execution"
    # Queued experiments ran in copies under .dvc/tmp/exps but wrote to the repository's own store.
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("mlflow.db")) == ["mlflow.db"]
    assert not (repo / "mlruns").exists()
    with sqlite3.connect(repo / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.slow
def test_sharpen_takes_the_student_registered_by_the_pipeline(repo, tmp_path):
    """After `make run` (`dvc repro`): `sharpkd sharpen photo.png --model models:/sharpkd-student/1
    -o out.png`; version 1 is the file the pipeline exported, and its aliases say so."""
    from sharpkd.fetch import file_digest

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    aliases = {a: str(v) for a, v in client.get_registered_model("sharpkd-student").aliases.items()}
    newest = max(int(v.version) for v in client.search_model_versions("name = 'sharpkd-student'"))
    assert aliases == {"champion": "1", "challenger": str(newest)}
    exported = repo / "models/export/student.onnx"  # the baseline's: queued experiments ran in copies
    assert client.get_model_version("sharpkd-student", "1").tags["sharpkd.onnx_sha256"] == file_digest(
        exported
    )
    photo = next((repo / "data/pairs/valid/input").iterdir())
    shutil.copy(photo, tmp_path / "photo.png")
    env = clean_env(SHARPKD_MODELS_DIR=str(tmp_path / "cache"))
    outputs = {}
    for model in ("models:/sharpkd-student/1", str(exported)):
        out = tmp_path / f"out{len(outputs)}.png"
        cmd = [
            str(VENV_BIN / "sharpkd"),
            "sharpen",
            str(tmp_path / "photo.png"),
            "--model",
            model,
            "-o",
            str(out),
        ]
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        outputs[model] = out.read_bytes()
    assert outputs["models:/sharpkd-student/1"] == outputs[str(exported)]


@pytest.mark.slow
def test_a_copy_of_a_checkout_that_ran_the_pipeline_records_into_itself(repo, tmp_path):
    """The issue's case: `cp -a repo copy && cd copy && PYTHONPATH=src python stages/evaluate.py`."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(repo), str(copy)], check=True)
    before = artifact_files(repo / "mlartifacts")
    started = int(time.time() * 1000)
    res = subprocess.run(
        [sys.executable, "stages/evaluate.py"],
        cwd=copy,
        env=clean_env(PYTHONPATH=str(copy / "src")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert artifact_files(repo / "mlartifacts") == before, "the copy wrote into the original's mlartifacts/"
    client = MlflowClient(f"sqlite:///{copy}/mlflow.db")
    (run,) = runs_of(client, f"attributes.run_name = 'evaluate' and attributes.start_time >= {started}")
    assert run.info.artifact_uri == (copy / "mlartifacts" / run.info.run_id / "artifacts").as_uri()
    here = artifact_files(copy / "mlartifacts" / run.info.run_id / "artifacts")
    assert any(n.startswith("compare/") for n in here) and "dvc/eval.json" in here


@pytest.mark.slow
def test_cached_stages_log_nothing_reruns_and_failures_say_so(repo):
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    before = {r.info.run_id for r in runs_of(client)}
    out = dvc(repo, "repro").stdout
    assert "Running stage" not in out
    assert {r.info.run_id for r in runs_of(client)} == before, "a cached stage logs nothing"

    params_path = repo / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["export"]["speed_repeats"] = 2
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        dvc(repo, "repro")
        (parent,) = [
            r for r in runs_of(client, "tags.`sharpkd.role` = 'pipeline'") if r.info.run_id not in before
        ]
        assert parent.info.status == "FINISHED"
        assert (
            parent.data.tags["sharpkd.stages"] == "export" and parent.data.tags["sharpkd.partial"] == "true"
        )
        assert "download" in parent.data.tags["mlflow.note.content"]
        assert set(children(client, parent.info.run_id)) == {"export"}

        # A stage that fails: its run and the parent are FAILED with the message.
        seen = {r.info.run_id for r in runs_of(client)}
        params["teacher"].update(source="checkpoint", checkpoint="missing_teacher.pth")
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        res = dvc(repo, "repro", "teacher", check=False)
        assert res.returncode != 0
        (failed,) = [r for r in runs_of(client, "tags.`sharpkd.role` = 'stage'") if r.info.run_id not in seen]
        assert failed.info.run_name == "teacher" and failed.info.status == "FAILED"
        assert "missing_teacher.pth" in failed.data.tags["error"]
        assert "missing_teacher.pth" in res.stderr + res.stdout
        parent = client.get_run(failed.data.tags["mlflow.parentRunId"])
        assert parent.info.status == "FAILED" and parent.data.tags["error"].startswith("teacher: ")
    finally:
        params_path.write_text(original)


# --------------------------------------------------------------------------- issue 40 (hardening, round 4)


def test_row02_the_default_experiment_keeps_its_artifacts_in_this_checkout(
    workdir, monkeypatch, tmp_path_factory
):
    """`tracking.experiment: Default` (MLflow's own experiment, located at `<folder it was made in>/mlruns/0`):
    its runs' artifacts go into this checkout, and a copy's into the copy, never the original's."""
    params = tiny_params(tracking={"enabled": True, "experiment": "Default"})

    def note(text: str) -> str:
        Path("note.txt").write_text(text)
        with tracking.stage_run("export", params) as t:
            t.log_artifact("note.txt", "notes")
        return t.run_id

    first = note("original")
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert client.get_experiment("0").artifact_location == str(workdir / "mlruns" / "0")
    assert (workdir / "mlruns" / "0" / first / "artifacts" / "notes" / "note.txt").read_text() == "original"
    before = artifact_files(workdir / "mlruns")
    copy = tmp_path_factory.mktemp("elsewhere") / "copy"
    subprocess.run(["cp", "-a", str(workdir), str(copy)], check=True)
    monkeypatch.chdir(copy)
    second = note("copy")
    assert artifact_files(workdir / "mlruns") == before, "the copy wrote into the original"
    assert (copy / "mlruns" / "0" / second / "artifacts" / "notes" / "note.txt").read_text() == "copy"
    client = MlflowClient(f"sqlite:///{copy}/mlflow.db")
    assert client.get_run(first).info.artifact_uri.startswith(str(copy / "mlruns" / "0") + "/")
