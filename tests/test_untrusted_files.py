"""No file the project loads can run code: a crafted pickle planted where a checkpoint or weights
file is read (the resume checkpoint, a teacher checkpoint, models/teacher/teacher.pth, a student
.pth, `sharpkd sharpen --model`, `sharpkd bench --model`, the VGG19 file) runs nothing and is
reported in one line naming the file (the resume checkpoint is set aside and training restarts).

The pickle's payload would create a marker file; every test asserts that the marker does not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import loss_params
from sharpkd.cli import app
from sharpkd.errors import UserError
from sharpkd.losses import VGG19_FILE, DistillObjective
from sharpkd.models.student import Student, load_student
from sharpkd.models.teacher_loader import load_spandrel, load_teacher
from sharpkd.train import FitConfig, fit

torch.set_num_threads(1)


class Payload:
    """Unpickling this runs `exec` (what a crafted checkpoint does); the code creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path, **extra) -> Path:
    """A real torch.save file (zip format) holding the payload beside ordinary entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"payload": Payload(marker), **extra}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "CODE_RAN"


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"input": torch.rand(2, 3, 8, 8, generator=g), "hr": torch.rand(2, 3, 8, 8, generator=g)}


def test_resume_checkpoint(tmp_path, marker, capsys):
    """train.fit: a planted ckpt.pt is never unpickled with code; it is set aside and training restarts."""
    ckpt = plant(tmp_path / "checkpoints" / "ckpt.pt", marker, step=3, steps=4)
    student = Student(scale=2, channels=4, blocks=1)
    result = fit(
        DistillObjective(student, loss_params(kd=0)),
        _batch,
        FitConfig(steps=4, lr=1e-3, checkpoint_every=2),
        checkpoint_path=ckpt,
    )
    assert not marker.exists(), "the planted checkpoint ran its code"
    assert result.resumed_from == 0 and result.steps == 4
    err = capsys.readouterr().err
    assert str(ckpt) in err and "could run code" in err and "step 0" in err
    assert (ckpt.parent / "ckpt.pt.unreadable").is_file()  # kept for a look, out of the way
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # the new run's own checkpoint


def test_teacher_checkpoint(tmp_path, marker):
    """teacher.source=checkpoint: spandrel's restricted unpickler refuses it."""
    path = plant(tmp_path / "teacher.pth", marker)
    with pytest.raises(UserError, match="teacher.pth"):
        load_spandrel(path, 2)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["edsr", "pan", "spandrel"])
def test_teacher_folder(tmp_path, marker, loader):
    """models/teacher/teacher.pth, whichever loader teacher.json names."""
    folder = tmp_path / "teacher"
    plant(folder / "teacher.pth", marker)
    info = {"loader": loader, "scale": 2, "arch": {"scale": 2, "channels": 8, "blocks": 1}}
    (folder / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="teacher.pth"):
        load_teacher(folder)
    assert not marker.exists()


def test_student_pth(tmp_path, marker):
    """models/student/student.pth, read by evaluate, export and the CLI."""
    path = plant(tmp_path / "student.pth", marker, arch={"scale": 2}, state_dict={})
    with pytest.raises(UserError, match="student.pth: not a sharpkd student checkpoint.*could run code"):
        load_student(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("command", "name", "trust", "what"),
    [
        ("sharpen", "evil.pth", False, "not a sharpkd student checkpoint"),
        ("sharpen", "evil.pt", False, "a TorchScript model runs the code it carries"),
        ("sharpen", "evil.pt", True, "not a TorchScript model"),
        ("bench", "evil.pth", False, "not a sharpkd student checkpoint"),
        ("bench", "evil.pt", False, "a TorchScript model runs the code it carries"),
    ],
)
def test_model_option(tmp_path, marker, monkeypatch, command, name, trust, what):
    """`sharpkd sharpen --model` / `sharpkd bench --model` (a .pth student, or a .pt read as
    TorchScript: refused as code unless it is the checkout's export or --trust-code is given, and
    with --trust-code still no pickle runs): one line, exit 1, nothing run."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # a checkout without an export (models/export/model_card.json)
    path = plant(tmp_path / name, marker, arch={"scale": 2}, state_dict={})
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    args = ["sharpen", str(tmp_path / "in.png")] if command == "sharpen" else ["bench", "--sizes", "16x16"]
    res = CliRunner().invoke(app, [*args, "--model", str(path), *(["--trust-code"] if trust else [])])
    assert res.exit_code == 1
    assert f"{name}: {what}" in res.stderr and "Traceback" not in res.output
    assert res.stderr.strip().count("\n") == 0
    assert not marker.exists()


def test_vgg19_weights(tmp_path, marker):
    """loss.perceptual's VGG19 file, found in weights.dir."""
    plant(tmp_path / VGG19_FILE, marker)
    with pytest.raises(UserError, match=VGG19_FILE):
        DistillObjective(
            Student(scale=2, channels=4, blocks=1), loss_params(perceptual=0.1), weights_dir=tmp_path
        )
    assert not marker.exists()
