"""loss.perceptual's VGG19 file: found, else downloaded and verified like every other weights file.

No test touches the internet: a tiny stand-in for torchvision's vgg19-dcbb9e9d.pth (random weights,
only the layers up to relu3_4) is served from 127.0.0.1, and fetch.PRETRAINED["vgg19"] is pointed at
it with that file's own sha256 prefix (torchvision's convention: the first 8 hex digits).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from helpers import NullTracker, loss_params, make_teacher_cache, serve_folder, stage_paths, tiny_params
from sharpkd import fetch
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.losses import VGG19_FILE, VGG19_URL, DistillObjective
from sharpkd.models.student import Student

torch.set_num_threads(1)


@pytest.fixture
def served(tmp_path) -> Path:
    """A folder holding a small VGG19 state dict under torchvision's file name."""
    from torchvision.models import vgg19

    folder = tmp_path / "served"
    folder.mkdir()
    torch.manual_seed(0)
    feats = vgg19().features[:18]  # up to relu3_4, the deepest of params.yaml's perceptual_layers
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, folder / VGG19_FILE)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """torch's hub cache in tmp_path, empty: what a machine that never downloaded VGG19 has."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def point_vgg19_at(monkeypatch, url: str, sha256: str) -> None:
    monkeypatch.setitem(
        fetch.PRETRAINED, "vgg19", {**fetch.PRETRAINED["vgg19"], "url": url, "sha256": sha256}
    )


def perceptual_objective(weights_dir: Path) -> DistillObjective:
    return DistillObjective(
        Student(scale=2, channels=8, blocks=1),
        loss_params(pixel=1, kd=0, perceptual=0.1),
        weights_dir=weights_dir,
    )


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{VGG19_FILE}"


def test_vgg19_is_pinned_to_torchvisions_file():
    spec = fetch.PRETRAINED["vgg19"]
    assert spec["url"] == VGG19_URL == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    assert spec["filename"] == VGG19_FILE and spec["sha256"] == "dcbb9e9d"  # the prefix in the name


def test_perceptual_run_downloads_verifies_and_trains(tmp_path, served, hub, monkeypatch):
    """The distill stage with loss.perceptual > 0 and no VGG19 file anywhere: downloaded into
    weights.dir, verified, and the student trains with the perceptual term."""
    wdir = tmp_path / "weights"
    params = tiny_params(
        loss={"perceptual": 0.1}, weights={"dir": str(wdir)}, distill={"steps": 4, "eval_every": 4}
    )
    root = make_teacher_cache(tmp_path / "pipe", params)
    with serve_folder(served) as base:
        point_vgg19_at(monkeypatch, base + VGG19_FILE, file_digest(served / VGG19_FILE)[:8])
        from stages import distill

        summary = distill.run(params, stage_paths(root), NullTracker())
    assert file_digest(wdir / VGG19_FILE) == file_digest(served / VGG19_FILE)
    assert not list(wdir.glob("*.part")) and not hub.exists()
    assert summary["steps"] == 4
    student = json.loads((root / "models" / "student" / "student.json").read_text())
    assert "perceptual" in student["loss_terms"]
    # Next time the file is there: used with no server at all.
    point_vgg19_at(monkeypatch, closed_port_url(), "0" * 8)
    assert perceptual_objective(wdir).vgg is not None


def test_wrong_hash_is_refused_and_removed(tmp_path, served, hub, monkeypatch):
    wdir = tmp_path / "weights"
    with serve_folder(served) as base:
        point_vgg19_at(monkeypatch, base + VGG19_FILE, "0" * 8)
        with pytest.raises(UserError) as err:
            perceptual_objective(wdir)
    msg = str(err.value)
    assert VGG19_FILE in msg and base + VGG19_FILE in msg and "sha256 mismatch" in msg
    assert "\n" not in msg
    assert not (wdir / VGG19_FILE).exists() and not (hub / VGG19_FILE).exists()
    assert not list(wdir.glob("*")) and not hub.exists()  # no .part left either


def test_offline_error_names_file_url_and_folders(tmp_path, hub, monkeypatch):
    url = closed_port_url()
    point_vgg19_at(monkeypatch, url, "dcbb9e9d")
    wdir = tmp_path / "w"
    with pytest.raises(UserError) as err:
        perceptual_objective(wdir)
    msg = str(err.value)
    assert VGG19_FILE in msg and url in msg and str(wdir) in msg and str(hub) in msg
    assert "loss.perceptual=0" in msg and "\n" not in msg
    assert "partial file" not in msg  # nothing was received, nothing is kept
    assert not (wdir / VGG19_FILE).exists()


def test_hub_cache_used_then_downloaded_into_when_weights_dir_is_not_writable(
    tmp_path, served, hub, monkeypatch
):
    # A file already in torch's hub cache (torchvision put it there) is used as it is.
    hub.mkdir(parents=True)
    (hub / VGG19_FILE).write_bytes((served / VGG19_FILE).read_bytes())
    point_vgg19_at(monkeypatch, closed_port_url(), "dcbb9e9d")
    assert perceptual_objective(tmp_path / "w").vgg is not None
    (hub / VGG19_FILE).unlink()
    # weights.dir cannot be created (a file is in the way): the download goes to the hub cache.
    (tmp_path / "blocked").write_text("")
    with serve_folder(served) as base:
        point_vgg19_at(monkeypatch, base + VGG19_FILE, file_digest(served / VGG19_FILE)[:8])
        perceptual_objective(tmp_path / "blocked" / "w")
    assert file_digest(hub / VGG19_FILE) == file_digest(served / VGG19_FILE)
