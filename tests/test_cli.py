"""The `sharpkd` command line: every command's --help, and `sharpkd bench` on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sharpkd.cli import app
from sharpkd.models.student import Student, save_student

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["sharpen"], ["bench"], ["ui"]])
def test_help_of_every_command(command):
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_installed_entry_point_runs():
    exe = Path(sys.executable).with_name("sharpkd")
    if not exe.is_file():
        pytest.skip(f"no sharpkd console script beside {sys.executable} (package not installed with pip -e)")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "sharpen" in res.stdout and "bench" in res.stdout


@pytest.fixture
def tiny_pth(tmp_path):
    student = Student(scale=2, channels=8, blocks=1)
    torch.nn.init.normal_(student.tail.weight, std=0.1)
    save_student(student, tmp_path / "s.pth")
    return tmp_path / "s.pth"


def test_bench_prints_a_table_and_writes_json(tmp_path, tiny_pth):
    out = tmp_path / "bench.json"
    res = runner.invoke(
        app,
        ["bench", "--model", str(tiny_pth), "--sizes", "64x48,40x40", "--repeats", "1", "--json", str(out)],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    for text in ("ms per frame", "64x48", "40x40", "torch", "onnxruntime"):
        assert text in res.output, text
    data = json.loads(out.read_text())
    figures = data["figures"]
    assert figures["speed.student.torch_cpu.64x48.ms"] > 0
    assert figures["speed.student.onnxruntime_cpu.40x40.fps"] > 0
    assert data["threads"] == "default"  # ONNX Runtime's own
    assert {r["size"] for r in data["rows"]} == {"64x48", "40x40"}
    assert {(r["height"], r["width"]) for r in data["rows"]} == {
        (48, 64),
        (40, 40),
    }  # WxH on the command line


def test_bench_onnx_only(tmp_path, tiny_pth):
    from sharpkd.models.student import load_student
    from sharpkd.onnx_export import export_onnx

    onnx = export_onnx(load_student(tiny_pth), tmp_path / "s.onnx")
    res = runner.invoke(
        app, ["bench", "-m", str(onnx), "--sizes", "32x32", "--repeats", "1"], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 0, res.output
    assert "onnxruntime" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "huge"], "unknown size 'huge'"),
        (["--model", "nope.pth"], "nope.pth: model not found"),
        ([], "no student found"),
        (["--model", "s.pth", "--teacher", "--sizes", "32x32"], "no teacher found"),
    ],
)
def test_bench_errors_are_one_clear_line(tmp_path, tiny_pth, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # no models/ here
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code == 1
    assert message in res.stderr and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--sizes", "0x0"], 1, "error: --sizes: '0x0' has a side of 0 pixels; each side must be at least 1"),
        (["--sizes", "64x48,32x0"], 1, "error: --sizes: '32x0' has a side of 0 pixels"),
        (["--threads", "-3"], 2, "Invalid value for '--threads'"),
        (["--repeats", "0"], 2, "Invalid value for '--repeats'"),
        (["--json", "{tmp}/file/b.json"], 1, "error: --json {tmp}/file/b.json: cannot create {tmp}/file: {tmp}/file is a file"),
        (["--json", "{tmp}"], 1, "error: --json {tmp}: {tmp} is a folder; name a file"),
    ],
)  # fmt: skip
def test_bench_options_are_checked_before_any_timing(tmp_path, tiny_pth, monkeypatch, args, code, message):
    """Out of range or unwritable: one line (typer's usage error for a bound), and no timing has begun."""
    import sharpkd.deploy.bench

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sharpkd.deploy.bench, "time_target", lambda *a, **k: pytest.fail("timing began"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = runner.invoke(
        app, ["bench", "--model", str(tiny_pth), "--repeats", "1", *args], env={"COLUMNS": "300"}
    )
    assert res.exit_code == code, res.output
    assert message.replace("{tmp}", str(tmp_path)) in res.stderr and "Traceback" not in res.output
    if code == 1:
        assert res.stderr.strip().count("\n") == 0, res.stderr
