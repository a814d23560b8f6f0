"""The student zoo as a user meets it: shipped students checked against their cards, the default model
of `sharpkd sharpen`, `--model zoo:NAME`, `sharpkd zoo`, and `sharpkd adapt` (a zoo student fine-tuned to
footage, run end to end offline on the quick profile's data)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sharpkd.cli import app
from sharpkd.deploy import zoo
from sharpkd.errors import UserError
from tests.helpers import SHARED, TINY, deep_update, git_repo_copy, repo_params_dict
from tests.test_tracking import E2E, clean_env

SHARPKD = str(Path(sys.executable).parent / "sharpkd")
PAN_X4 = SHARED / "weights" / "PANx4_DF2K.pth"


def _photo(path: Path, size=(72, 56)) -> Path:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def tampered_zoo(tmp_path, monkeypatch) -> Path:
    """A copy of the zoo with one byte of zoo:balanced's INT8 file changed, as the zoo sharpkd reads."""
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    target = copy / "balanced" / "student_int8.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    return target


def test_the_zoo_ships_a_balanced_and_a_fast_student_with_their_figures():
    assert zoo.names()[:2] == ["balanced", "fast"]
    for name in ("balanced", "fast"):
        card = zoo.card(name)
        assert set(card["files"]) >= {"student_int8.onnx", "student.onnx", "student.pth"}
        for kind in zoo.FILES:
            found = zoo.zoo_file(f"zoo:{name}", kind)
            assert found.sha256 == card["files"][found.path.name]["sha256"]
        for set_name in ("Set5", "Manga109", "valid"):
            assert card["quality"][set_name]["psnr_int8"] > card["quality"][set_name]["bicubic_psnr"]
        # The reference budget or more, counting the steps of the student a fine-tuned one started from.
        steps = card["training"].get("total_steps") or card["recipe"]["distill.steps"]
        assert card["recipe"]["teacher.source"] == "pan" and steps >= 24000
    assert zoo.card("balanced")["arch"]["channels"] == 64 and zoo.card("fast")["arch"]["channels"] == 32


def test_a_tampered_zoo_file_is_refused_with_one_line(tampered_zoo):
    with pytest.raises(UserError) as err:
        zoo.zoo_file("zoo:balanced")
    assert "\n" not in str(err.value) and "sha256" in str(err.value) and str(tampered_zoo) in str(err.value)


def test_sharpen_refuses_a_tampered_zoo_file_with_one_line(tampered_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "in.png")
    res = CliRunner().invoke(app, ["sharpen", "in.png", "-o", "out.png", "--model", "zoo:balanced"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "sha256" in lines[0], res.output
    assert not (tmp_path / "out.png").exists()


def test_an_unknown_zoo_name_lists_the_known_ones():
    with pytest.raises(UserError, match="zoo:balanced, zoo:fast"):
        zoo.zoo_file("zoo:huge")


def test_sharpen_with_no_model_and_no_export_uses_the_balanced_student(tmp_path):
    """A fresh clone before `make run`, or any folder outside a checkout: zoo:balanced, said in one line."""
    src = _photo(tmp_path / "photo.png")
    res = subprocess.run(
        [SHARPKD, "sharpen", "photo.png", "-o", "out.png"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    said = [line for line in (res.stdout + res.stderr).splitlines() if "zoo:balanced" in line]
    assert len(said) == 1, res.stdout + res.stderr
    with Image.open(src) as a, Image.open(tmp_path / "out.png") as b:
        assert a.size == b.size and a.mode == b.mode
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 0.5  # it did sharpen


def test_model_zoo_fast_names_the_fast_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "in.png")
    res = CliRunner().invoke(app, ["sharpen", "in.png", "-o", "out.png", "--model", "zoo:fast"])
    assert res.exit_code == 0, res.output
    assert "zoo:fast" in res.output and (tmp_path / "out.png").is_file()


def test_the_zoo_command_lists_the_students_with_their_figures():
    res = CliRunner().invoke(app, ["zoo"])
    assert res.exit_code == 0, res.output
    for name in zoo.names():
        set5 = zoo.card(name)["quality"]["Set5"]["psnr_int8"]
        assert f"zoo:{name}" in res.output and f"{set5:.2f}" in res.output


def test_adapt_dry_run_plans_a_fine_tune_of_the_zoo_student(tmp_path, monkeypatch):
    clips = tmp_path / "clips"
    clips.mkdir()
    _photo(clips / "a.png")
    res = CliRunner().invoke(
        app, ["adapt", str(clips), "--from", "zoo:fast", "--dry-run", "-S", "distill.steps=10"]
    )
    assert res.exit_code == 0, res.output
    argv = shlex.split(res.output)
    assert argv[:5] == ["dvc", "exp", "run", "-n", argv[4]] and argv[4].startswith("adapt-clips-")
    sets = {a.split("=", 1)[0]: a.split("=", 1)[1].strip("'") for a in argv[6::2]}
    assert (
        sets["student.init"] == "zoo:fast"
        and sets["student.channels"] == "32"
        and sets["student.blocks"] == "4"
    )
    assert sets["data.teacher_only.folder"] == str(clips) and sets["distill.steps"] == "10"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere"], "nowhere: no such file or folder"),
        (["{dir}", "--from", "model.onnx"], "give zoo:NAME"),
        (["{dir}", "--from", "zoo:huge"], "no such student in the zoo"),
        (["{dir}", "-S", "distill.stepz=3"], "distill.stepz"),
        (["{dir}", "{file}"], "give one folder, or any number of clips and images, not both"),
    ],
)
def test_adapt_refuses_bad_input_in_one_line(tmp_path, args, message):
    folder = tmp_path / "in"
    folder.mkdir()
    photo = _photo(tmp_path / "p.png")
    args = [a.format(dir=folder, file=photo) for a in args]
    res = CliRunner().invoke(app, ["adapt", *args, "--dry-run"])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.slow
@pytest.mark.skipif(not PAN_X4.is_file(), reason=f"needs the PAN x4 weights ({PAN_X4} not on this machine)")
def test_adapt_runs_the_pipeline_from_a_zoo_student_and_says_how_to_sharpen(tmp_path):
    """Offline, on the quick profile's photos: PAN labels two images given by name, zoo:fast is fine-tuned a
    few steps, evaluated, exported and registered; the exported student is the result."""
    params = deep_update(deep_update(repo_params_dict(), TINY), E2E)
    params["data"]["scale"] = 4
    params["data"]["min_side"], params["data"]["patch_size"] = 64, 64
    repo = git_repo_copy(tmp_path / "repo", params, clean_env())
    inputs = [_photo(tmp_path / f"frame{i}.png", (96, 80)) for i in range(2)]
    res = subprocess.run(
        [SHARPKD, "adapt", *map(str, inputs), "--from", "zoo:fast", "--name", "adapt-test"]
        + ["-S", f"weights.dir={SHARED / 'weights'}", "-S", "distill.steps=6", "-S", "distill.batch_size=4"]
        + ["-S", "distill.eval_every=3", "-S", "distill.checkpoint_every=3", "-S", "distill.warmup_steps=2"],
        cwd=repo,
        env=clean_env(DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site")),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "sharpkd sharpen" in res.stdout and "student_int8.onnx" in res.stdout
    record = json.loads((repo / "metrics/adapt.json").read_text())
    assert record["experiment"] == "adapt-test" and record["from"] == "zoo:fast" and record["minutes"] > 0
    info = json.loads((repo / "models/student/student.json").read_text())
    assert (
        info["init"] == "zoo:fast"
        and info["init_sha256"] == zoo.card("fast")["files"]["student.pth"]["sha256"]
    )
    assert info["arch"]["channels"] == 32 and info["best_step"] == 6  # distill.keep last
    assert (repo / "models/export/student_int8.onnx").is_file()
