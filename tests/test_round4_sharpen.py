"""Hardening round 4 (hostile-user probe) of `sharpkd sharpen` and `sharpkd bench`: output names longer than
the file system takes, a container that cannot hold the codec, a dangling symlink at the output name, GIFs
in a folder, and `bench --video --teacher`. Each is refused (or done) before any work, in one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import write_clip
from sharpkd.cli import app
from sharpkd.models.student import Student
from sharpkd.onnx_export import export_onnx

runner = CliRunner()
RNG = np.random.default_rng(4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny x2 student as .onnx; its residual is small, so its output stays in 0-1 as a trained one's does
    (these tests are about files, not pixels)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    student = Student(scale=2, channels=8, blocks=1).eval()
    torch.nn.init.normal_(student.tail.weight, std=0.001)
    export_onnx(student, folder / "student.onnx")
    return folder / "student.onnx"


def run(*args, model=None):
    argv = [*map(str, args)] + (["-m", str(model)] if model is not None else [])
    return runner.invoke(app, argv, env={"COLUMNS": "200"})


def noise(h, w, c=3):
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


def clip(path, n=2):
    return write_clip(path, (noise(32, 32) for _ in range(n)))


def one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_row17_a_preview_name_too_long_for_a_new_folder_is_refused_at_planning(tmp_path, model):
    # The input's name fits (250 bytes); its preview's (258) does not. The folder does not exist yet, so
    # the file system only says so when the finished file is renamed into place: after the whole transcode.
    src = clip(tmp_path / ("a" * 246 + ".mp4"))
    res = run("sharpen", src, "-o", f"{tmp_path / 'new' / 'deeper'}/", "--preview", model=model)
    line = one_line_error(res)
    assert "its preview name (258 bytes) is longer than the file system allows (255)" in line
    assert "model:" not in res.output, "the work started before the names were checked"
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing made, not even the folder


def test_row17_a_new_folder_name_too_long_is_refused_at_planning(tmp_path, model):
    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    res = run("sharpen", tmp_path / "p.png", "-o", tmp_path / ("d" * 256) / "p.png", model=model)
    assert (
        "its output folder's name (256 bytes) is longer than the file system allows (255)"
        in one_line_error(res)
    )
    assert "model:" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_row23_a_container_that_cannot_hold_the_codec_is_refused_before_any_work(tmp_path, model):
    src = clip(tmp_path / "c.mp4")
    # A model that does not exist: the codec is refused before the model is even looked for.
    res = run("sharpen", src, "-o", tmp_path / "out.webm", model=tmp_path / "missing.onnx")
    line = one_line_error(res)
    assert "--codec libx264: .webm cannot hold h264 video" in line
    assert "libvpx-vp9" in line and "libx264" not in line.split("takes")[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]
    # One it names is taken.
    res = run("sharpen", src, "-o", tmp_path / "out.webm", "--codec", "libvpx-vp9", model=model)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.webm").is_file()


def test_row23_the_python_api_refuses_the_container_too(tmp_path, model):
    from sharpkd.deploy import sharpen_file
    from sharpkd.errors import UserError

    src = clip(tmp_path / "c.mp4")
    with pytest.raises(UserError, match=r"--codec libx264: \.webm cannot hold h264 video"):
        sharpen_file(src, tmp_path / "out.webm", tmp_path / "missing.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]


def test_row24_a_dangling_symlink_at_the_output_name_exists(tmp_path, model):
    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    (tmp_path / "p_sharp.png").symlink_to(tmp_path / "gone.png")
    res = run("sharpen", tmp_path / "p.png", model=model)
    assert f"{tmp_path / 'p_sharp.png'} exists; pass --overwrite to replace it" in one_line_error(res)
    assert "model:" not in res.output
    assert os.readlink(tmp_path / "p_sharp.png") == str(tmp_path / "gone.png")  # kept as it was
    res = run("sharpen", tmp_path / "p.png", "--overwrite", model=model)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "p_sharp.png").is_symlink() and (tmp_path / "p_sharp.png").is_file()
    assert not (tmp_path / "gone.png").exists()


def test_row24_the_python_api_says_exists_for_a_dangling_symlink(tmp_path, model):
    from sharpkd.deploy import sharpen_file
    from sharpkd.errors import UserError

    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    (tmp_path / "o.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match="o.png exists; pass overwrite=True"):
        sharpen_file(tmp_path / "p.png", tmp_path / "o.png", model)


def test_row26_a_gif_in_a_folder_is_sharpened_from_its_first_frame(tmp_path, model):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(noise(8, 8)).save(src / "a.png")
    frames = [Image.fromarray(noise(10, 12)) for _ in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    res = run("sharpen", src, "-o", tmp_path / "out", model=model)
    assert res.exit_code == 0, res.output
    assert (
        "anim.gif ->" in res.output
        and "3 frames (animated or multi-page): only the first is used" in res.output
    )
    assert "sharpened 2 file(s)" in res.output
    with Image.open(tmp_path / "out" / "anim.png") as out:
        assert out.size == (12, 10) and out.format == "PNG"


def test_row27_bench_video_with_teacher_is_refused(tmp_path, model):
    args = ("bench", "--video", "--teacher", "--sizes", "32x32", "--frames", "2", "--repeats", "1")
    res = run(*args, "--json", tmp_path / "b.json", model=model)
    line = one_line_error(res)
    assert "--teacher" in line and "--video" in line
    assert not (tmp_path / "b.json").exists()
