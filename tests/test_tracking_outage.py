"""A tracking server that is unreachable, or dies in the middle of a stage (src/sharpkd/tracking/outage.py):
real `mlflow server` processes on 127.0.0.1, started and killed with real signals, and real stage
processes (run_stage) that train, checkpoint and log on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from helpers import TINY, deep_update, repo_params_dict, tiny_params
from sharpkd import tracking

# template_db and workdir: fixtures, used through request.getfixturevalue
from test_tracking import E2E, clean_env, free_port, start_mlflow_server, stop, template_db, workdir  # noqa: F401

# A stage that trains: a step every ~0.3 s, a checkpoint each step, metrics flushed at once (a real
# training batches them for 10 s), then a model card as an artifact and its final figures.
# argv: steps, the step after which it waits for the file `go` (the test kills the server meanwhile),
# and a file it waits for before it ends ("-": none).
TRAINING_STAGE = """
import sys, time
from pathlib import Path
from sharpkd.pipeline import run_stage
import sharpkd.tracking.runs as runs

runs._FLUSH_EVERY_S = 0.0
steps, pause_after, before_end = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def wait_for(name):
    while not Path(name).exists():
        time.sleep(0.05)

def run(params, paths, tracker):
    out = Path("out")
    out.mkdir(exist_ok=True)
    for step in range(1, steps + 1):
        if step == pause_after + 1:
            wait_for("go")
        start = time.monotonic()
        time.sleep(0.3)
        (out / f"ckpt-{step}.pt").write_text(str(step))
        tracker.log_metrics({"train.loss": 1.0 / step}, step=step)
        print(f"step {step} {time.monotonic() - start:.2f}", flush=True)
    (out / "model_card.md").write_text("# card")
    tracker.log_artifact(out / "model_card.md")
    tracker.log_metrics({"distill.final_loss": 1.0 / steps})
    if before_end != "-":
        wait_for(before_end)
    return {}

run_stage("distill", run)
"""


@pytest.fixture
def no_mlflow_env():
    """No MLflow settings from this process's environment, and none left behind (the project's client
    sets the HTTP ones, tracking/store.py)."""
    before = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def project(no_mlflow_env, request) -> Path:
    """test_tracking's project root (dvc.yaml, no DVC/MLflow settings) with params.yaml, tracking on,
    and no local store."""
    root = request.getfixturevalue("workdir")
    (root / "mlflow.db").unlink()
    params = deep_update(deep_update(repo_params_dict(), TINY), E2E)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


class Server:
    """`mlflow server` on 127.0.0.1:`port` over the SQLite store `db`; start() again after kill()."""

    def __init__(self, db: Path, port: int):
        self.db, self.port, self.proc = db, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> Server:
        self.proc = start_mlflow_server(self.db, self.port)
        return self

    def kill(self) -> None:
        """SIGKILL to the server and its workers: no goodbye, the port closes."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"port {self.port} still answers after the server was killed")


@pytest.fixture
def server(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("server")
    shutil.copy(request.getfixturevalue("template_db"), folder / "server.db")
    srv = Server(folder / "server.db", free_port())
    try:
        yield srv
    finally:
        if srv.proc is not None:
            stop(srv.proc)


def test_the_project_client_gets_short_timeouts_unless_the_user_set_them(no_mlflow_env):
    from sharpkd.tracking.store import HTTP_DEFAULTS, LockedClient, Store

    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "33"
    LockedClient(Store("http://127.0.0.1:9", None, None))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    assert {k: os.environ[k] for k in HTTP_DEFAULTS if k != "MLFLOW_HTTP_REQUEST_TIMEOUT"} == {
        k: v for k, v in HTTP_DEFAULTS.items() if k != "MLFLOW_HTTP_REQUEST_TIMEOUT"
    }


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_unreachable_server_fails_the_stage_within_seconds(project, kind):
    """`MLFLOW_TRACKING_URI=http://127.0.0.1:9 dvc repro`: one line naming the server and
    `tracking.enabled: false`, exit status 1, before any work; it used to sit 254 s in silence."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if kind == "refused":
        listener.close()  # nothing listens there
    else:
        listener.listen(16)  # connections are taken by the kernel, never answered
    try:
        start = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-c", TRAINING_STAGE, "3", "9", "-"],
            cwd=project,
            env=clean_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - start
    finally:
        listener.close()
    assert res.returncode == 1, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith("error [distill]: tracking: the MLflow server http://127.0.0.1:")
    assert f":{port} cannot be reached" in line and "tracking.enabled: false" in line
    assert ("no answer within 5 s" in line) == (kind == "silent")
    assert not (project / "out").exists(), "the stage did work before it failed"
    assert not list(project.glob("*.db")) and not (project / "metrics").exists()
    print(f"unreachable server ({kind}): the stage failed after {took:.1f} s (imports included)")
    assert took < 60


def _kill_during_training(project: Path, server: Server, before_end: str) -> tuple[subprocess.Popen, str]:
    """Start the training stage against `server`, kill the server after its third step, let it go on;
    the process and what it printed until then."""
    env = clean_env(MLFLOW_TRACKING_URI=server.uri, DVC_EXP_NAME="outage")
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINING_STAGE, "8", "3", before_end],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = [proc.stdout.readline() for _ in range(3)]
    assert all(ln.startswith("step ") for ln in lines), "".join(lines) + proc.stderr.read()[-3000:]
    server.kill()
    (project / "go").touch()
    return proc, "".join(lines)


def _step_times(out: str) -> dict[int, float]:
    return {int(p[1]): float(p[2]) for p in (ln.split() for ln in out.splitlines()) if p[:1] == ["step"]}


def _recorded(client: MlflowClient, steps: int = 8) -> None:
    """The stage's run and its parent hold everything, as if the server had never gone."""
    (parent,) = tracking_runs(client, "attributes.run_name = 'outage'")
    (child,) = tracking_runs(client, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    history = client.get_metric_history(child.info.run_id, "train.loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert child.info.status == "FINISHED" and child.data.tags["device"]
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["model_card.md"]
    assert parent.info.status == "FINISHED" and parent.data.tags["sharpkd.stages"] == "distill"
    assert parent.data.metrics["distill.final_loss"] == pytest.approx(1 / steps)


def tracking_runs(client: MlflowClient, filter_string: str) -> list:
    exp = client.get_experiment_by_name("sharpkd")
    return client.search_runs([exp.experiment_id], filter_string)


def test_a_server_killed_mid_training_costs_nothing_and_is_sent_later(project, server, monkeypatch):
    """The server is killed (SIGKILL) after step 3 of 8 and stays down: every step still takes its
    normal time, all checkpoints and outputs are written, the stage ends with status 0 and two lines
    (when the server was lost, and at the end) naming the server and where the rest is kept; once
    the server is back, the next stage sends it and the run is complete."""
    server.start()
    proc, before = _kill_during_training(project, server, "-")
    killed_at = time.monotonic()
    out, err = proc.communicate(timeout=240)
    after_kill = time.monotonic() - killed_at
    assert proc.returncode == 0, err[-3000:]
    times = _step_times(before + out)
    assert sorted(times) == list(range(1, 9)) and max(times[s] for s in range(4, 9)) < 8, times
    assert sorted(p.name for p in (project / "out").iterdir())[:8] == [f"ckpt-{i}.pt" for i in range(1, 9)]
    assert "Traceback" not in err
    said = [ln for ln in err.splitlines() if "tracking" in ln]
    assert len(said) == 2, err
    lost, end = said
    assert lost.startswith(f"[distill] warning: tracking: the MLflow server {server.uri} failed (")
    assert "Connection refused" in lost and "metrics/unlogged/distill-" in lost
    assert end.startswith(f"[distill] warning: tracking: the MLflow server {server.uri} still fails")
    assert "incomplete" in end and "python -m sharpkd.tracking" in end
    (kept,) = (project / "metrics" / "unlogged").iterdir()
    ops = [json.loads(ln) for ln in (kept / "ops.jsonl").read_text().splitlines()]
    steps_kept = sorted(
        m[3] for op in ops if op["op"] == "metrics" for m in op["items"] if m[0] == "train.loss"
    )
    assert steps_kept == list(range(steps_kept[0], 9)) and steps_kept[0] <= 4
    assert any(op["op"] == "artifact" and (kept / op["path"]).read_text() == "# card" for op in ops)
    print(
        f"server killed: steps 4-8 took {[times[s] for s in range(4, 9)]} s; stage ended {after_kill:.1f} s later"
    )

    # The server comes back; the next stage (here another execution's) sends what was kept.
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    with tracking.stage_run("evaluate", tiny_params(tracking={"enabled": True})):
        pass
    assert not kept.exists() and not kept.parent.exists()
    _recorded(MlflowClient(server.uri))


def test_a_server_back_before_the_stage_ends_gets_everything(project, server):
    """A blip: the server is killed after step 3 and restarted before the stage ends; the stage sends
    what it kept on its way out, exit status 0, nothing is left on disk."""
    server.start()
    proc, before = _kill_during_training(project, server, "finish")
    deadline = time.monotonic() + 120
    while not (project / "out" / "model_card.md").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    server.start()
    (project / "finish").touch()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    times = _step_times(before + out)
    assert max(times[s] for s in range(4, 9)) < 8, times
    said = [ln for ln in err.splitlines() if "tracking" in ln]
    assert len(said) == 2, err
    assert said[1] == f"[distill] tracking: the MLflow server {server.uri} answers again; all is logged"
    assert not (project / "metrics" / "unlogged").exists()
    _recorded(MlflowClient(server.uri))


def test_kept_operations_can_be_sent_by_hand(project, server):
    """`python -m sharpkd.tracking` sends what stages kept, when no stage is to run."""
    server.start()
    proc, _ = _kill_during_training(project, server, "-")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and (project / "metrics" / "unlogged").is_dir(), err[-3000:]
    env = clean_env(MLFLOW_TRACKING_URI=server.uri)
    cmd = [sys.executable, "-m", "sharpkd.tracking"]
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "cannot be reached" in res.stderr and "Traceback" not in res.stderr
    server.start()
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tracking: sent what the distill stage had kept in metrics/unlogged/distill-" in res.stdout
    assert not (project / "metrics" / "unlogged").exists()
    _recorded(MlflowClient(server.uri))


# --------------------------------------------------------------------------- issue 40 (hardening, round 4)


def _outbox(root: Path, lines: list[str], name: str = "distill-x") -> Path:
    """An outbox under root/metrics/unlogged whose stage process has ended, holding `lines` after the header."""
    from sharpkd.tracking.store import resolve_store

    folder = root / "metrics" / "unlogged" / name
    (folder / "files" / "1").mkdir(parents=True)
    (folder / "files" / "1" / "note.txt").write_text("kept")
    store = resolve_store(None, root)
    # This process with another start time: a stage process that has ended.
    header = {
        "op": "header",
        "store": store.uri,
        "stage": "distill",
        "process": f"{socket.gethostname()}:{os.getpid()}:1",
    }
    (folder / "ops.jsonl").write_text("\n".join([json.dumps(header), *lines]) + "\n")
    return folder


@pytest.fixture
def root(no_mlflow_env, request) -> Path:
    """test_tracking's project root (dvc.yaml, a ready store, no DVC/MLflow settings)."""
    return request.getfixturevalue("workdir")


def _a_run(root: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("sharpkd", artifact_location=(root / "mlartifacts").as_uri())
    return client, client.create_run(exp).info.run_id


def _send(root: Path) -> list[str]:
    from sharpkd.tracking.outage import send_pending
    from sharpkd.tracking.store import LockedClient, resolve_store

    return send_pending(LockedClient(resolve_store(None, root)), root)


@pytest.mark.parametrize(
    "path",
    [
        "/etc/hostname",
        "../../../../etc/hostname",
        "files/1/../../../../etc/hostname",
        "files/link",
        "files/dir",
    ],
)
@pytest.mark.parametrize("op", ["artifact", "artifacts", "model"])
def test_row08_the_outbox_replay_sends_only_copies_inside_it(root, path, op):
    """A line naming a file outside the outbox's files/ (absolute, `../`, a link out, a folder holding one)
    sends nothing: one warning naming the line, the outbox kept; no file from outside is uploaded."""
    client, run = _a_run(root)
    secret = root / "secret.txt"
    secret.write_text("secret")
    ops = [
        json.dumps({"op": "metrics", "run": run, "items": [["a", 1.0, 0, 0]]}),
        json.dumps({"op": op, "run": run, "path": path, "dest": "x", "name": None, "experiment": "0"}),
    ]
    folder = _outbox(root, ops)
    (folder / "files" / "link").symlink_to(secret)
    (folder / "files" / "dir").mkdir()
    (folder / "files" / "dir" / "in.txt").symlink_to(secret)
    (note,) = _send(root)
    assert note.startswith("warning: tracking: metrics/unlogged/distill-x/ops.jsonl: line 3: its path"), note
    assert "nothing was sent from it and it is kept" in note
    assert folder.is_dir() and client.list_artifacts(run) == [] and client.get_run(run).data.metrics == {}


@pytest.mark.parametrize("dest", ["../../escape", "/abs", "a/../../b"])
def test_row08_an_artifact_destination_stays_inside_the_run(root, dest):
    client, run = _a_run(root)
    folder = _outbox(
        root, [json.dumps({"op": "artifact", "run": run, "path": "files/1/note.txt", "dest": dest})]
    )
    (note,) = _send(root)
    assert "line 2: its artifact destination" in note and folder.is_dir()
    assert not list(root.rglob("escape")) and client.list_artifacts(run) == []


def test_row08_the_outbox_is_git_ignored():
    from helpers import REPO

    assert "/metrics/unlogged/" in (REPO / ".gitignore").read_text().splitlines()
    probe = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", "metrics/unlogged/distill-x/ops.jsonl"], cwd=REPO
    )
    assert probe.returncode == 0


def test_row08_a_good_outbox_is_still_sent(root):
    """The checks leave the ordinary case alone, a last line cut short by a kill included."""
    client, run = _a_run(root)
    folder = _outbox(
        root,
        [
            json.dumps({"op": "metrics", "run": run, "items": [["a", 1.0, 0, 0]]}),
            json.dumps({"op": "artifact", "run": run, "path": "files/1/note.txt", "dest": "notes"}),
        ],
    )
    with (folder / "ops.jsonl").open("a") as f:
        f.write('{"op": "metrics", "run": "')  # its writer was killed here
    (note,) = _send(root)
    assert note == "tracking: sent what the distill stage had kept in metrics/unlogged/distill-x/", note
    assert not folder.exists() and [a.path for a in client.list_artifacts(run)] == ["notes"]
    assert client.get_run(run).data.metrics == {"a": 1.0}


def _send_by_hand(root: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """`python -m sharpkd.tracking` in `root` (in this process: a new one takes a minute on a busy machine)."""
    from sharpkd.tracking.__main__ import main

    monkeypatch.chdir(root)
    capsys.readouterr()
    status = main()
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("where", ["middle", "header", "utf8"])
def test_row09_a_damaged_outbox_is_named_kept_and_exits_1(root, monkeypatch, capsys, where):
    """A damaged line (not a last line cut short) or header: nothing is sent, the damage is named, the
    folder stays, `python -m sharpkd.tracking` exits 1 and never says "nothing is kept"."""
    client, run = _a_run(root)
    good = json.dumps({"op": "metrics", "run": run, "items": [["a", 1.0, 0, 0]]})
    folder = _outbox(root, [good, '{"op": "metrics", "ru', good])
    lines = (folder / "ops.jsonl").read_text().splitlines()
    if where == "header":
        (folder / "ops.jsonl").write_text("\n".join(['{"op": "head', lines[1], lines[3]]) + "\n")
    elif where == "utf8":
        (folder / "ops.jsonl").write_bytes("\n".join(lines[:2]).encode() + b"\n\xff\xfe\n")
    said = {
        "middle": "line 3 is damaged",
        "header": "its header (line 1) is damaged",
        "utf8": "line 3 is not UTF-8",
    }
    status, out, err = _send_by_hand(root, monkeypatch, capsys)
    assert status == 1, out + err
    assert f"metrics/unlogged/distill-x/ops.jsonl: {said[where]}" in err, err
    assert "nothing is kept" not in out + err
    assert folder.is_dir() and client.get_run(run).data.metrics == {}


def test_row09_an_outbox_left_for_another_store_is_not_called_nothing(root, monkeypatch, capsys):
    _a_run(root)
    folder = _outbox(root, [])
    text = (folder / "ops.jsonl").read_text().replace("sqlite:///", "sqlite:///elsewhere")
    (folder / "ops.jsonl").write_text(text)
    status, out, err = _send_by_hand(root, monkeypatch, capsys)
    assert status == 1 and "still kept: metrics/unlogged/distill-x/" in err, out + err
