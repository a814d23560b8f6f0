"""The stages as DVC runs them (stages/__init__.py, check_params), end to end in a real repository
copy with real DVC and MLflow: a stage killed with SIGKILL part-way leaves nothing that outlives
the next `dvc repro`, and any edit of params.yaml is validated, also of a key no stage lists."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from helpers import TINY, deep_update, git_repo_copy, repo_params_dict
from test_tracking import E2E, clean_env, dvc, runs_of

# files.atomic_dir's temporaries: `.<output>.<pid>-<random>.tmp` beside the output.
TEMP = re.compile(r"\..+\.(\d+)-[a-z0-9_]{8}\.tmp(\.[^.]*)?")


def temporaries(repo: Path) -> list[Path]:
    skip = {".git", ".dvc"}
    return [
        p
        for p in repo.rglob(".*")
        if not skip & set(p.relative_to(repo).parts[:1])
        and (TEMP.fullmatch(p.name) or p.name.endswith(".old"))
    ]


def test_every_stage_removes_what_killed_stages_left_beside_any_output(tmp_path, monkeypatch):
    """DVC may restore a killed stage's outputs from its run cache without running it: the next
    stage that runs, whichever it is, removes the killed one's temporaries (a live writer's stay)."""
    from sharpkd.pipeline import remove_killed_leftovers

    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "a": {"cmd": "x", "outs": ["data/teacher", {"models/checkpoints": {"persist": True}}]},
                    "b": {"cmd": "y", "metrics": ["metrics/eval.json"]},
                }
            }
        )
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [
        Path(f"data/.teacher.{dead.pid}-abcdefgh.tmp"),
        Path(f"models/checkpoints/.ckpt.pt.{dead.pid}-abcdefgh.tmp.pt"),
        Path(f"metrics/.eval.json.{dead.pid}-abcdefgh.tmp.json"),
    ]
    live = Path(f"data/.raw.{os.getpid()}-abcdefgh.tmp")
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.suffix == ".tmp" else path.write_text("")
    remove_killed_leftovers()
    assert [p for p in stale if p.exists()] == [] and live.is_dir()


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory) -> dict:
    """`dvc repro` with cache_teacher killed (SIGKILL) while it writes data/teacher, then `dvc repro` again."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    params = deep_update(deep_update(repo_params_dict(), TINY), E2E)
    repo = git_repo_copy(tmp_path_factory.mktemp("faults") / "repo", params, clean_env())
    env = clean_env(DVC_SITE_CACHE_DIR=str(repo.parent / "dvc-site"))
    log = open(repo.parent / "repro.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    victim, deadline = None, time.monotonic() + 600
    try:
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            # The writer's pid is in its temporary folder's name: kill exactly that process.
            found = [m for p in (repo / "data").glob(".teacher.*.tmp") if (m := TEMP.fullmatch(p.name))]
            if found:
                victim = int(found[0].group(1))
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.01)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    first = (repo.parent / "repro.log").read_text()
    assert victim is not None, f"cache_teacher was never caught writing:\n{first[-3000:]}"
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    state = {
        "repo": repo,
        "first_status": proc.returncode,
        "temps_after_kill": temporaries(repo),
        "running_after_kill": [r.info.run_id for r in runs_of(client, "attributes.status = 'RUNNING'")],
        "git_status_after_kill": subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout,
    }
    state["rerun"] = dvc(repo, "repro", check=False)
    return state


@pytest.mark.slow
def test_a_stage_killed_part_way_leaves_nothing_behind(killed_then_rerun):
    s = killed_then_rerun
    repo = s["repo"]
    # What the kill left: a temporary folder, and the stage's run and its parent RUNNING.
    assert s["first_status"] != 0
    assert [p.name.split(".")[1] for p in s["temps_after_kill"]] == ["teacher"]
    assert len(s["running_after_kill"]) == 2
    assert ".tmp" not in s["git_status_after_kill"]  # git ignores the temporaries (.gitignore)

    assert s["rerun"].returncode == 0, s["rerun"].stdout[-3000:] + s["rerun"].stderr[-3000:]
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    assert temporaries(repo) == []
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    assert runs_of(client, "attributes.status = 'RUNNING'") == []
    for run_id in s["running_after_kill"]:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and "ended without closing this run" in run.data.tags["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["data"].update(patch_sise=64), "unknown key 'data.patch_sise'"),
        (lambda p: p.update(distil={"steps": 10}), "unknown key 'distil'"),
        (lambda p: p.clear(), "params.yaml is empty"),
    ],
    ids=["typo-in-a-group", "typo-at-top-level", "empty-file"],
)
def test_any_edit_of_params_yaml_is_validated_by_dvc_repro(killed_then_rerun, edit, message):
    """Keys no stage lists: without check_params, DVC ran nothing and said the pipeline was up to date."""
    repo = killed_then_rerun["repo"]
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    edit(params)
    try:
        path.write_text(yaml.safe_dump(params) if params else "")
        res = dvc(repo, "repro", check=False)
        assert res.returncode != 0, res.stdout[-2000:]
        out = res.stdout + res.stderr
        assert "error [check_params]: params: " in out and message in out
        assert "Running stage 'download'" not in out  # nothing else ran
    finally:
        path.write_text(original)
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout


@pytest.mark.slow
def test_changing_the_crop_size_reruns_only_what_uses_it(tmp_path_factory):
    """data.patch_size is read by the stages that train (distill, the from-scratch teacher) and by
    INT8 calibration (export), not by degrade or cache_teacher: no stored pixel depends on it, so
    `dvc status` after changing it lists neither (at the full profile ~30 GB of pairs and cache)."""
    from test_tracking import pipeline_repo

    repo = pipeline_repo(tmp_path_factory)
    params_file = repo / "params.yaml"
    before = params_file.read_text()
    assert dvc(repo, "status", "--json").stdout.strip() in ("{}", ""), "the pipeline is up to date first"
    params = yaml.safe_load(before)
    params["data"]["patch_size"] = params["data"]["patch_size"] // 2
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(dvc(repo, "status", "--json").stdout or "{}"))
    finally:
        params_file.write_text(before)
    assert {"distill", "export"} <= changed, changed
    assert not changed & {"download", "degrade", "cache_teacher"}, changed
