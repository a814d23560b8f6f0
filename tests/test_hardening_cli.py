"""Hardening, round 3, of `sharpkd sharpen` and `sharpkd bench`: a TorchScript --model that is not the
checkout's export (its code does not run without --trust-code), a name too long for its output and an
unreadable folder entry beside good files, SIGTERM mid-folder and what a kill leaves, models that are not
sharpening models (another size, NaN), and options out of range. Each case gives one line naming the
file, key or option and what to do; exit status 1 (143 for SIGTERM); what was finished is kept. Real
files, real models (ONNX built with onnx.helper, TorchScript scripted here), real processes and signals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

import sharpkd
from sharpkd.cli import app
from sharpkd.fetch import file_digest
from sharpkd.files import _TEMP
from sharpkd.models.student import Student
from sharpkd.onnx_export import export_onnx, export_torchscript
from test_hardening import _without_dac_override  # setpriv: root without its file-permission bypass

runner = CliRunner()
SRC = Path(sharpkd.__file__).parents[1]  # the sharpkd under test, for the processes the tests start
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
# `sharpkd ...` in a fresh process, as a user runs it.
SHARPKD = [sys.executable, "-c", "import sys; from sharpkd.cli import app; sys.argv[0] = 'sharpkd'; app()"]


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _png(path: Path, h: int, w: int, seed: int = 0, value: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb if value is None else np.full_like(rgb, value)).save(path)
    return path


def _onnx(path: Path, nodes: list, inits: list) -> Path:
    """An ONNX model from nodes reading `input` (1,3,h,w float) and writing `output`."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, None, None])
    graph = helper.make_graph(nodes, "m", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this ONNX Runtime reads
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _const(name: str, *values: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.float32), name)


def identity_onnx(path: Path) -> Path:
    return _onnx(path, [helper.make_node("Identity", ["input"], ["output"])], [])


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> dict[str, Path]:
    """A tiny x2 student as .onnx and TorchScript .pt."""
    folder = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    model = Student(scale=2, channels=8, blocks=1).eval()
    return {"onnx": export_onnx(model, folder / "s.onnx"), "pt": export_torchscript(model, folder / "s.pt")}


def _sharpen(*args) -> object:
    return runner.invoke(app, ["sharpen", *map(str, args)], env={"COLUMNS": "200"})


# ------------------------------------------------------------------ (2) TorchScript carries code


class ReadsAFile(torch.nn.Module):
    """What a crafted TorchScript file can do: its forward returns another file's bytes as the pixels."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, False, x.numel(), dtype=torch.uint8)
        return data.reshape(x.shape).float() / 255.0


@pytest.fixture
def crafted_pt(tmp_path) -> tuple[Path, bytes]:
    secret = bytes(range(256)) * 32  # enough bytes for the test image the loader runs a model on
    (tmp_path / "secret").write_bytes(secret)
    path = tmp_path / "x.pt"
    torch.jit.save(torch.jit.script(ReadsAFile(str(tmp_path / "secret"))), str(path))
    return path, secret


def test_a_torchscript_model_that_is_not_the_export_runs_only_with_trust_code(
    tmp_path, monkeypatch, crafted_pt
):
    path, secret = crafted_pt
    monkeypatch.chdir(tmp_path)  # a checkout without an export
    _png(tmp_path / "img.png", 8, 8)
    res = _sharpen("img.png", "--model", path)
    assert res.exit_code == 1 and not (tmp_path / "img_sharp.png").exists()
    line = _one_line(res.stderr)
    assert f"{path}: a TorchScript model runs the code it carries" in line and "--trust-code" in line
    assert "models/export/model_card.json" in line
    # Asked for, it runs: the pixels are the other file's bytes (what the code does).
    res = _sharpen("img.png", "--model", path, "--trust-code")
    assert res.exit_code == 0, res.output
    planes = np.frombuffer(secret[: 3 * 8 * 8], np.uint8).reshape(3, 8, 8)  # the model's (C,H,W) output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "img_sharp.png")), planes.transpose(1, 2, 0))
    # bench loads it the same way.
    res = runner.invoke(app, ["bench", "--model", str(path), "--sizes", "16x16", "--repeats", "1"])
    assert res.exit_code == 1 and "runs the code it carries" in _one_line(res.stderr)
    res = runner.invoke(app, ["bench", "-m", str(path), "--sizes", "16x16", "--repeats", "1", "--trust-code"])
    assert res.exit_code == 0 and "torchscript" in res.output, res.output


def test_the_checkouts_own_torchscript_export_is_taken_by_its_recorded_hash(tmp_path, monkeypatch, student):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()  # a checkout: only its root's card vouches for its export (round 4, row 3)
    export = tmp_path / "models" / "export"
    export.mkdir(parents=True)
    shutil.copy(student["pt"], export / "student.pt")
    card = {"files": {"student.pt": {"bytes": 1, "sha256": file_digest(export / "student.pt")}}}
    (export / "model_card.json").write_text(json.dumps(card))
    _png(tmp_path / "img.png", 20, 24)
    res = _sharpen("img.png", "--model", export / "student.pt")
    assert res.exit_code == 0, res.output
    shutil.copy(student["pt"], tmp_path / "copy.pt")  # the same bytes anywhere
    assert _sharpen("img.png", "-m", "copy.pt", "-o", "copy.png").exit_code == 0
    # Changed after the export recorded it: refused (a card beside a file vouches for nothing).
    (tmp_path / "other").mkdir()
    changed = tmp_path / "other" / "student.pt"
    changed.write_bytes((export / "student.pt").read_bytes() + b"\0")
    (tmp_path / "other" / "model_card.json").write_text(
        json.dumps({"files": {"student.pt": {"sha256": file_digest(changed)}}})
    )
    res = _sharpen("img.png", "-m", changed, "-o", "changed.png")
    assert res.exit_code == 1 and "runs the code it carries" in _one_line(res.stderr)
    assert not (tmp_path / "changed.png").exists()


# ------------------------------------------------------------------ (5) names too long, unreadable entries


def test_an_input_whose_output_name_is_too_long_is_skipped_and_the_others_done(tmp_path, student):
    folder = tmp_path / "photos"
    long = _png(folder / ("a" * 247 + ".png"), 16, 16)  # 251 characters: + "_sharp" is over 255
    _png(folder / "good.png", 16, 16)
    res = _sharpen(folder, "-m", student["onnx"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # not an OSError
    assert (folder / "good_sharp.png").is_file()
    line = _one_line(res.stderr)
    assert f"{long}: its output name (257 bytes) is longer than the file system allows" in line
    assert "-o FOLDER" in line
    # Into a folder, outputs keep the input's name: it fits.
    res = _sharpen(folder, "-m", student["onnx"], "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / long.name).is_file()


def test_unreadable_entries_of_an_input_folder_are_named_and_the_rest_done(tmp_path, student):
    folder = tmp_path / "photos"
    for rel in ("good.png", "locked/a.png", "closed/b.png"):
        _png(folder / rel, 16, 16)
    modes = {folder / "locked": 0o600, folder / "closed": 0o000}  # names listed, not looked at; not listed
    for path, mode in modes.items():
        path.chmod(mode)
    cmd = [*_without_dac_override(), *SHARPKD, "sharpen", str(folder), "-m", str(student["onnx"])]
    try:
        proc = subprocess.run(cmd, env={**ENV, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    finally:
        for path in modes:
            path.chmod(0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (folder / "good_sharp.png").is_file()
    assert f"{folder / 'closed'}: cannot be read (Permission denied); skipped" in proc.stderr
    # Listed (its name can be read) but not looked at: its output cannot be checked, said on its line.
    locked = [line for line in proc.stderr.splitlines() if str(folder / "locked" / "a.png") in line]
    assert len(locked) == 1 and "(Permission denied)" in locked[0], proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr


# ------------------------------------------------------------------ (6) SIGTERM, kills, temporaries


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of 3 large noise PNGs, an identity model): writing each output takes a while, so a
    run is caught with its temporary in the output folder."""
    folder = tmp_path_factory.mktemp("big")
    for i in range(3):
        _png(folder / "in" / f"{i}.png", 1500, 1500, seed=i)
    return folder / "in", identity_onnx(folder / "id.onnx")


def _temporaries(folder: Path) -> list[str]:
    return (
        sorted(n for n in os.listdir(folder) if n.startswith(".") and ".tmp" in n) if folder.is_dir() else []
    )


def _stopped_while_writing(inputs: Path, model: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """`sharpkd sharpen inputs -o out` in a process, sent `sig` once a temporary shows in `out`."""
    cmd = [*SHARPKD, "sharpen", str(inputs), "-o", str(out), "-m", str(model)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not _temporaries(out):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no temporary seen in {out} while it ran: {proc.communicate()}")
        time.sleep(0.002)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_sigterm_mid_folder_removes_its_temporaries_and_a_rerun_works(tmp_path, big_folder):
    inputs, model = big_folder
    out = tmp_path / "out"
    proc = _stopped_while_writing(inputs, model, out, signal.SIGTERM)
    assert proc.returncode == 143, proc
    assert _one_line(proc.stderr).startswith("sharpen: terminated;")
    assert _temporaries(out) == []
    done = sorted(p.name for p in out.iterdir())
    assert len(done) < 3 and all(np.asarray(Image.open(out / n)).shape == (1500, 1500, 3) for n in done)
    res = _sharpen(inputs, "-o", out, "-m", model, "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == ["0.png", "1.png", "2.png"]


def test_a_killed_runs_temporary_is_removed_by_the_next_run_and_never_an_input(tmp_path, big_folder):
    inputs, model = big_folder
    out = tmp_path / "out"
    proc = _stopped_while_writing(inputs, model, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = _temporaries(out)
    assert left and all(_TEMP.fullmatch(n) for n in left)  # what a kill leaves: nothing can clean up
    # The output folder as an input: the half-written temporary is not taken for an image.
    done = sorted(n for n in os.listdir(out) if not n.startswith("."))
    res = _sharpen(out, "-o", tmp_path / "again", "-m", model)
    assert ".tmp" not in res.output and _temporaries(out) == left
    if done:
        assert res.exit_code == 0 and sorted(os.listdir(tmp_path / "again")) == done, res.output
    else:
        assert res.exit_code == 1 and f"{out}: no images or videos found" in res.stderr
    # A rerun into that folder removes it (its writer is gone).
    res = _sharpen(inputs, "-o", out, "-m", model, "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == ["0.png", "1.png", "2.png"]


# ------------------------------------------------------------------ (8) not a sharpening model


@pytest.mark.parametrize(
    ("name", "nodes", "inits", "problem"),
    [
        (
            "double.onnx",
            [helper.make_node("Resize", ["input", "", "scales"], ["output"], mode="nearest")],
            [_const("scales", 1, 1, 2, 2)],
            "a 1x3x36x48 input gives 1x3x72x96 (a sharpening model keeps the size)",
        ),
        (
            "nan.onnx",
            [helper.make_node("Mul", ["input", "nan"], ["output"])],
            [_const("nan", float("nan"))],
            "its output on a 36x48 test image holds NaN or infinite values",
        ),
    ],
)
def test_a_model_that_is_not_a_sharpening_model_is_refused_before_any_output(
    tmp_path, name, nodes, inits, problem
):
    model = _onnx(tmp_path / name, nodes, inits)
    _png(tmp_path / "small.png", 96, 96)
    _png(tmp_path / "tiled.png", 150, 140)
    res = _sharpen(tmp_path / "small.png", tmp_path / "tiled.png", "-m", model, "--tile", "64")
    assert res.exit_code == 1
    assert _one_line(res.stderr) == f"error: {model}: not a sharpening model: {problem}; nothing was written"
    assert not list(tmp_path.glob("*_sharp*"))


def test_a_model_whose_output_is_not_finite_on_one_image_writes_nothing_for_it(tmp_path):
    """log(1 - x) is finite on the load-time test image (values below 1) and -inf on a white pixel."""
    nodes = [helper.make_node("Sub", ["one", "input"], ["d"]), helper.make_node("Log", ["d"], ["output"])]
    model = _onnx(tmp_path / "log.onnx", nodes, [_const("one", 1.0)])
    white, grey = (
        _png(tmp_path / "white.png", 32, 32, value=255),
        _png(tmp_path / "grey.png", 32, 32, value=128),
    )
    res = _sharpen(white, grey, "-m", model)
    assert res.exit_code == 1
    assert (
        f"{model}: not a sharpening model: its output on {white} holds NaN or infinite values" in res.stderr
    )
    assert not (tmp_path / "white_sharp.png").exists() and (tmp_path / "grey_sharp.png").is_file()


# ------------------------------------------------------------------ (10) options out of range


def test_tile_below_the_minimum_is_refused(tmp_path, student):
    _png(tmp_path / "t.png", 20, 20)
    res = _sharpen(tmp_path / "t.png", "-m", student["onnx"], "--tile", "0")
    assert res.exit_code == 1 and _one_line(res.stderr) == "error: --tile must be at least 16, got 0"
    assert not (tmp_path / "t_sharp.png").exists()
