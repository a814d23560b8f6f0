"""check_params stops a run whose pretrained files cannot be had (issue: `dvc exp run -S loss.perceptual=0.1`
offline failed in distill, after DVC had deleted models/student, with a 780-character line).

No test touches the internet: the files' URLs point at 127.0.0.1 (a folder served there, or a closed port),
a name that cannot resolve is a getaddrinfo that fails, and the `dvc repro` below goes through a proxy
on a closed local port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import NullTracker, deep_update, git_repo_copy, repo_params_dict, serve_folder, tiny_params
from sharpkd import fetch
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.pipeline import StagePaths
from stages import check_params

VGG = fetch.PRETRAINED["vgg19"]["filename"]
PAN = fetch.PRETRAINED["pan_x2"]["filename"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A user with nothing downloaded yet: HOME, weights.dir's default (~/.cache/sharpkd/weights) and
    torch's hub cache all in tmp_path, empty."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHARPKD_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "home"


def point_at(monkeypatch, key: str, url: str, sha256: str | None = None) -> None:
    spec = fetch.PRETRAINED[key]
    monkeypatch.setitem(
        fetch.PRETRAINED,
        key,
        {**spec, "url": url, "sha256": sha256 if sha256 is not None else spec["sha256"]},
    )


def closed_port_url(name: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def run_check(**params) -> dict:
    return check_params.run(tiny_params(**params), StagePaths(), NullTracker())


def failure(**params) -> str:
    """check_params' error line as run_stage prints it; one line, under 200 characters."""
    with pytest.raises(UserError) as err:
        run_check(**params)
    line = f"error [check_params]: {err.value}"
    assert "\n" not in line and len(line) < 200, (len(line), line)
    return line


def test_offline_perceptual_fails_in_one_line_naming_the_file_and_what_to_do(home, monkeypatch):
    """The issue's case: no VGG19 anywhere, and its host does not resolve (offline)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "download.example.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    point_at(monkeypatch, "vgg19", f"https://download.example.test/models/{VGG}")
    line = failure(loss={"perceptual": 0.1})
    assert line == (
        f"error [check_params]: loss.perceptual needs {VGG}: not found, cannot download (DNS failure for "
        "download.example.test); put it in ~/.cache/sharpkd/weights or set loss.perceptual=0"
    )


def test_a_pretrained_teacher_that_cannot_be_had_fails_too(home, tmp_path, monkeypatch):
    url = closed_port_url(PAN)
    point_at(monkeypatch, "pan_x2", url)
    line = failure(teacher={"source": "pan"}, weights={"dir": str(home / "w")})
    assert f"teacher.source pan needs {PAN}" in line and "connection refused by 127.0.0.1:" in line
    point_at(monkeypatch, "dctlsa_x2", closed_port_url("X2.pt"))
    (home / "w").mkdir(parents=True)
    (home / "w" / PAN).write_bytes(b"pan")  # there now; the ensemble's DCTLSA is not
    point_at(monkeypatch, "pan_x2", url, file_digest(home / "w" / PAN))
    line = failure(teacher={"source": "pan", "ensemble": ["dctlsa"]}, weights={"dir": str(home / "w")})
    assert "teacher.ensemble dctlsa needs DCTLSA_X2.pt" in line and "put it in ~/w" in line


def test_files_at_hand_need_no_network(home, tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / VGG).write_bytes(b"vgg weights")
    point_at(monkeypatch, "vgg19", closed_port_url(VGG), file_digest(hub / VGG)[:8])
    assert run_check(loss={"perceptual": 0.1})["pretrained"] == [VGG]
    # Nothing needed (the quick profile: a teacher trained here, no perceptual loss): nothing asked.
    point_at(monkeypatch, "vgg19", "http://unused.example.test/", "0" * 8)
    assert run_check(loss={"perceptual": 0.0})["pretrained"] == []


def test_a_wrong_file_is_named_with_what_to_do(home, tmp_path, monkeypatch):
    wdir = home / ".cache" / "sharpkd" / "weights"
    wdir.mkdir(parents=True)
    (wdir / VGG).write_bytes(b"something else")
    point_at(monkeypatch, "vgg19", closed_port_url(VGG), "dcbb9e9d")
    line = failure(loss={"perceptual": 0.1})
    assert line.startswith(
        f"error [check_params]: loss.perceptual: ~/.cache/sharpkd/weights/{VGG} has sha256 "
    )
    assert "not dcbb9e9d...: delete it or put the official file there" in line


def test_a_missing_file_its_server_has_passes_without_downloading_it(home, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / VGG).write_bytes(os.urandom(4096))
    with serve_folder(site) as base:
        point_at(monkeypatch, "vgg19", base + VGG, file_digest(site / VGG)[:8])
        assert run_check(loss={"perceptual": 0.1})["pretrained"] == [VGG]
    assert not list((tmp_path / "hub").rglob(VGG)) and not list(home.rglob(VGG))  # distill downloads it


def test_a_missing_teacher_checkpoint_fails(home, tmp_path):
    line = failure(teacher={"source": "checkpoint", "checkpoint": str(tmp_path / "nope.pth")})
    assert "teacher.checkpoint" in line and "nope.pth" in line


@pytest.mark.slow
def test_dvc_repro_offline_stops_in_check_params_before_any_other_stage(tmp_path):
    """`dvc repro` as a user runs it, offline (the proxy, on a closed local port, answers nothing): the run
    stops in check_params with its one line, and no other stage has run (none deleted an output)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    params = deep_update(repo_params_dict(), {"loss": {"perceptual": 0.1}, "tracking": {"enabled": False}})
    proxy = closed_port_url("").rstrip("/")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "SHARPKD_"))}
    env = {k: v for k, v in env.items() if k.lower() not in ("no_proxy", "torch_home", "xdg_cache_home")}
    env |= {
        "HOME": str(tmp_path / "home"),
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    repo = git_repo_copy(tmp_path / "repo", params, env)
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    (line,) = [s for s in out.splitlines() if s.startswith("error [check_params]")]
    assert line == (
        f"error [check_params]: loss.perceptual needs {VGG}: not found, cannot download (proxy for "
        "download.pytorch.org unreachable); put it in ~/.cache/sharpkd/weights or set loss.perceptual=0"
    )
    assert "Running stage 'check_params'" in out and out.count("Running stage") == 1, out[-3000:]
