"""`sharpkd sharpen` on images (alpha, 16-bit, grayscale, EXIF, bad files, folders, globs) and video."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sharpkd.cli import app
from sharpkd.deploy.images import load_image
from sharpkd.models.student import Student, save_student
from sharpkd.onnx_export import export_onnx, export_torchscript
from sharpkd.tensors import to_image, to_tensor

runner = CliRunner()
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny x2 student with a non-zero residual branch, as .pth, .onnx and TorchScript .pt."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    student = Student(scale=2, channels=8, blocks=1).eval()
    torch.nn.init.normal_(student.tail.weight, std=0.1)
    save_student(student, folder / "student.pth")
    export_onnx(student, folder / "student.onnx")
    export_torchscript(student, folder / "student.pt")
    return {
        "student": student,
        "onnx": folder / "student.onnx",
        "pth": folder / "student.pth",
        "pt": folder / "student.pt",
    }


def sharpen(*args, models=None):
    argv = ["sharpen", *map(str, args)]
    if models is not None:
        argv += ["-m", str(models["onnx"])]
    return runner.invoke(app, argv, env={"COLUMNS": "200"})


def expected(student, rgb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return to_image(student(to_tensor(rgb)), 16 if rgb.dtype == np.uint16 else 8)


def noise(h, w, c=3, dtype=np.uint8):
    peak = 65535 if dtype == np.uint16 else 255
    shape = (h, w, c) if c > 1 else (h, w)
    return RNG.integers(0, peak + 1, shape, dtype=dtype)


def test_png_with_alpha_keeps_alpha(tmp_path, models):
    rgba = noise(40, 50, 4)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    res = sharpen(tmp_path / "a.png", models=models)
    assert res.exit_code == 0, res.output
    out = load_image(tmp_path / "a_sharp.png")
    np.testing.assert_array_equal(out.alpha, rgba[..., 3])
    want = expected(models["student"], rgba[..., :3])
    assert np.abs(out.rgb.astype(int) - want).max() <= 1
    assert np.abs(out.rgb.astype(int) - rgba[..., :3]).max() > 5, "the model changed nothing"


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_stays_16bit(tmp_path, models, suffix):
    rgb16 = noise(33, 47, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / f"deep{suffix}"), rgb16[..., ::-1])
    res = sharpen(tmp_path / f"deep{suffix}", models=models)
    assert res.exit_code == 0, res.output
    out = load_image(tmp_path / f"deep_sharp{suffix}", keep_16bit=True)
    assert out.rgb.dtype == np.uint16 and out.rgb.shape == (33, 47, 3)
    # 16 bits all the way: ORT float32 vs torch differ by far less than one 16-bit step.
    assert np.abs(out.rgb.astype(int) - expected(models["student"], rgb16)).max() <= 1


def test_grayscale_jpeg(tmp_path, models):
    Image.fromarray(noise(30, 20, c=1), "L").save(tmp_path / "g.jpg")
    res = sharpen(tmp_path / "g.jpg", models=models)
    assert res.exit_code == 0, res.output
    out = Image.open(tmp_path / "g_sharp.jpg")
    assert out.size == (20, 30) and out.format == "JPEG"


def test_exif_rotated_jpeg_is_written_upright(tmp_path, models):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, displayed rotated by 90 degrees: 20 wide x 40 high
    Image.fromarray(noise(20, 40)).save(tmp_path / "r.jpg", exif=exif)
    res = sharpen(tmp_path / "r.jpg", "-o", tmp_path / "r_out.jpg", models=models)
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "r_out.jpg") as out:
        assert out.size == (20, 40)
        assert out.getexif().get(0x0112, 1) == 1  # no orientation left to apply twice


def test_corrupt_file_is_named_and_the_others_are_done(tmp_path, models):
    for name in ("one.png", "two.png"):
        Image.fromarray(noise(16, 18)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    res = sharpen(tmp_path / "one.png", tmp_path / "broken.png", tmp_path / "two.png", models=models)
    assert res.exit_code == 1
    assert "broken.png" in res.stderr and "Traceback" not in res.output
    assert (tmp_path / "one_sharp.png").is_file() and (tmp_path / "two_sharp.png").is_file()
    assert not (tmp_path / "broken_sharp.png").exists()


def test_folder_to_output_folder_keeps_relative_names(tmp_path, models):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(noise(12, 14)).save(src / "a.png")
    Image.fromarray(noise(12, 14)).save(src / "sub" / "b.webp", lossless=True)
    (src / "notes.txt").write_text("not an image, ignored in a folder")
    res = sharpen(src, "-o", tmp_path / "out", models=models)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out/a.png").is_file() and (tmp_path / "out/sub/b.webp").is_file()
    assert not list(src.rglob("*_sharp*"))


def test_glob_and_earlier_outputs_are_skipped(tmp_path, models):
    for name in ("x.png", "y.png"):
        Image.fromarray(noise(10, 10)).save(tmp_path / name)
    Image.fromarray(noise(10, 10)).save(tmp_path / "z.jpg")
    res = sharpen(str(tmp_path / "*.png"), models=models)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.glob("*_sharp*")) == ["x_sharp.png", "y_sharp.png"]
    # A second run over the same glob does not sharpen the sharpened: the *_sharp files are skipped.
    res = sharpen(str(tmp_path / "*.png"), "--overwrite", models=models)
    assert res.exit_code == 0, res.output
    assert "skipped 2 earlier output" in res.output
    assert not list(tmp_path.glob("*_sharp_sharp*"))


def test_refuses_to_overwrite_outputs_and_inputs(tmp_path, models):
    Image.fromarray(noise(10, 12)).save(tmp_path / "p.png")
    assert sharpen(tmp_path / "p.png", models=models).exit_code == 0
    before = (tmp_path / "p_sharp.png").read_bytes()
    (tmp_path / "p_sharp.png").write_bytes(b"keep me")
    res = sharpen(tmp_path / "p.png", models=models)
    assert res.exit_code == 1 and "--overwrite" in res.stderr
    assert (tmp_path / "p_sharp.png").read_bytes() == b"keep me"
    original = (tmp_path / "p.png").read_bytes()
    res = sharpen(tmp_path / "p.png", "-o", tmp_path / "p.png", models=models)
    assert res.exit_code == 1 and "would overwrite an input" in res.stderr
    assert (tmp_path / "p.png").read_bytes() == original
    res = sharpen(tmp_path / "p.png", "--overwrite", models=models)
    assert res.exit_code == 0 and (tmp_path / "p_sharp.png").read_bytes() == before


def test_pth_and_torchscript_models_give_the_onnx_result(tmp_path, models):
    img = noise(26, 31)
    Image.fromarray(img).save(tmp_path / "m.png")
    outs = []
    for kind in ("onnx", "pth", "pt"):
        res = runner.invoke(
            app,
            [
                "sharpen",
                str(tmp_path / "m.png"),
                "-o",
                str(tmp_path / f"{kind}.png"),
                "-m",
                str(models[kind]),
                "--trust-code",  # the .pt is not this checkout's export (models/export/model_card.json)
            ],
        )
        assert res.exit_code == 0, res.output
        outs.append(np.asarray(Image.open(tmp_path / f"{kind}.png")).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1 and np.abs(outs[0] - outs[2]).max() <= 1


def test_small_tiles_match_whole_image(tmp_path, models):
    """The ONNX session goes through tiled_apply: many tiles give the whole-image result."""
    img = noise(90, 100)
    Image.fromarray(img).save(tmp_path / "big.png")
    res = sharpen(
        tmp_path / "big.png", "--tile", "48", "--overlap", "32", "-o", tmp_path / "tiled.png", models=models
    )
    assert res.exit_code == 0, res.output
    tiled = np.asarray(Image.open(tmp_path / "tiled.png")).astype(int)
    assert np.abs(tiled - expected(models["student"], img)).max() <= 1


def test_missing_model_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(noise(8, 8)).save(tmp_path / "i.png")
    # With no --model and no export the zoo's student runs (tests/test_zoo.py); a named file that is missing:
    res = runner.invoke(app, ["sharpen", "i.png", "--model", "models/export/student_int8.onnx"])
    assert res.exit_code == 1
    assert "models/export/student_int8.onnx" in res.stderr and "dvc repro export" in res.stderr
    assert "pass --model PATH" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def _video_info(path):
    cap = cv2.VideoCapture(str(path))
    info = (
        int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
        int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        cap.get(cv2.CAP_PROP_FPS),
    )
    cap.release()
    return info


def test_video_keeps_frames_size_and_fps_and_preview_is_side_by_side(tmp_path, models):
    writer = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 12, (64, 48))
    for _ in range(8):
        writer.write(noise(48, 64))
    writer.release()
    assert _video_info(tmp_path / "clip.mp4") == (8, 64, 48, 12.0)
    res = sharpen(tmp_path / "clip.mp4", "--preview", models=models)
    assert res.exit_code == 0, res.output
    assert "frames/s" in res.output
    assert _video_info(tmp_path / "clip_sharp.mp4") == (8, 64, 48, 12.0)
    assert _video_info(tmp_path / "clip_sharp_preview.mp4") == (8, 128, 48, 12.0)


def test_unreadable_video_is_reported(tmp_path, models):
    (tmp_path / "fake.mp4").write_bytes(b"no video here")
    Image.fromarray(noise(8, 8)).save(tmp_path / "ok.png")
    res = sharpen(tmp_path / "fake.mp4", tmp_path / "ok.png", models=models)
    assert res.exit_code == 1 and "fake.mp4" in res.stderr
    assert (tmp_path / "ok_sharp.png").is_file() and not (tmp_path / "fake_sharp.mp4").exists()


def test_cuda_without_cuda_is_a_clear_error(tmp_path, models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA: nothing to refuse")
    Image.fromarray(noise(8, 8)).save(tmp_path / "c.png")
    res = sharpen(tmp_path / "c.png", "--device", "cuda", models=models)
    assert res.exit_code == 1 and "CUDA" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "c_sharp.png").exists()


def test_bad_tiling_options(tmp_path, models):
    Image.fromarray(noise(8, 8)).save(tmp_path / "t.png")
    res = sharpen(tmp_path / "t.png", "--tile", "32", "--overlap", "32", models=models)
    assert res.exit_code == 1 and "--overlap" in res.stderr


# --------------------------------------------------------------------------- hostile inputs (issue 12)

ODD_NAMES = """
import os, sys
from sharpkd.cli import app
sys.argv = ["sharpkd", "sharpen", *sys.argv[1:]]
app()
"""


def _write_video(path, size=(64, 48), frames=4, api=None):
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if api is not None else "mp4v"))
    args = (str(path), api, fourcc, 12, size) if api is not None else (str(path), fourcc, 12, size)
    writer = cv2.VideoWriter(*args)
    for _ in range(frames):
        writer.write(noise(size[1], size[0]))
    writer.release()
    return path


def test_file_names_that_are_not_utf8_do_not_crash(tmp_path, models):
    """OpenCV segfaults on such names (lone surrogates in Python): run in a subprocess, so a crash
    fails this test instead of the test run. Videos go through PyAV, which takes any name."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    bad_png = src / os.fsdecode(b"bad\xff.png")
    ok, buf = cv2.imencode(".png", noise(12, 10, dtype=np.uint16))  # 16-bit: read through OpenCV
    bad_png.write_bytes(buf.tobytes())
    Image.fromarray(noise(12, 10)).save(src / "good.png")
    _write_video(src / "clip.mp4").rename(src / os.fsdecode(b"clip\xfe.mp4"))  # cv2 would crash on it
    proc = subprocess.run(
        [sys.executable, "-c", ODD_NAMES, os.fsencode(src), "-o", os.fsencode(tmp_path / "out")]
        + ["-m", str(models["onnx"])],
        capture_output=True,
        timeout=300,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{out}\n{err}"  # -11: the crash
    assert "bad\\xff.png ->" in out and "clip\\xfe.mp4 ->" in out and "sharpened 3 file(s)" in out
    assert "Traceback" not in err
    written = load_image(tmp_path / "out" / os.fsdecode(b"bad\xff.png"), keep_16bit=True)
    assert written.rgb.dtype == np.uint16 and (tmp_path / "out" / "good.png").is_file()
    import av  # not cv2: it would crash on the name

    with av.open(str(tmp_path / "out" / os.fsdecode(b"clip\xfe.mp4"))) as clip:
        assert [(f.width, f.height) for f in clip.decode(video=0)] == [(64, 48)] * 4


def test_video_to_an_image_name_is_refused_before_any_work(tmp_path, models):
    clip = _write_video(tmp_path / "clip.mp4")
    res = sharpen(clip, "-o", tmp_path / "out.png", models=models)
    assert res.exit_code == 1
    assert "out.png" in res.stderr and ".mp4" in res.stderr and "frames" not in res.output
    assert list(tmp_path.iterdir()) == [clip]


def test_odd_sized_video_keeps_its_size(tmp_path, models):
    # OpenCV's own MJPEG writer keeps odd sizes; the output is H.264 4:4:4 at exactly that size.
    clip = _write_video(tmp_path / "odd.avi", size=(35, 25), frames=3, api=cv2.CAP_OPENCV_MJPEG)
    assert _video_info(clip)[1:3] == (35, 25)
    res = sharpen(clip, models=models)
    assert res.exit_code == 0, res.output
    assert "3 frames, 35x25 at 12 fps, libx264 yuv444p" in res.output
    assert _video_info(tmp_path / "odd_sharp.mp4")[:3] == (3, 35, 25)


def test_animated_gif_says_only_the_first_frame_is_used(tmp_path, models):
    frames = [Image.fromarray(noise(10, 12)) for _ in range(4)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    res = sharpen(tmp_path / "anim.gif", models=models)
    assert res.exit_code == 0, res.output
    assert "4 frames (animated or multi-page): only the first is used" in res.output
    assert (tmp_path / "anim_sharp.png").is_file()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgba_stays_16bit(tmp_path, models, suffix):
    rgba16 = noise(21, 17, c=4, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / f"a{suffix}"), rgba16[..., [2, 1, 0, 3]])
    res = sharpen(tmp_path / f"a{suffix}", models=models)
    assert res.exit_code == 0, res.output
    assert "16-bit; alpha kept" in res.output and "8-bit" not in res.output
    out = load_image(tmp_path / f"a_sharp{suffix}", keep_16bit=True)
    assert out.rgb.dtype == np.uint16 and out.alpha.dtype == np.uint16
    np.testing.assert_array_equal(out.alpha, rgba16[..., 3])
    assert np.abs(out.rgb.astype(int) - expected(models["student"], rgba16[..., :3])).max() <= 1


def test_output_folder_that_does_not_exist_yet(tmp_path, models):
    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    res = sharpen(tmp_path / "p.png", "-o", f"{tmp_path / 'newdir'}/", models=models)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "newdir" / "p.png").is_file()


def _unwritable(tmp_path):
    """(-o target, the folder the message must name) that cannot be written, root or not."""
    import os

    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        return tmp_path / "ro" / "x.png", tmp_path / "ro"
    if not os.path.isdir("/proc/self"):
        pytest.skip("running as root without /proc: no folder here refuses a write")
    return tmp_path.root + "proc/sharpkd-test/x.png", "/proc"


@pytest.mark.parametrize("case", ["suffix", "parent is a file", "read-only"])
def test_output_problems_are_found_before_inference(tmp_path, models, case):
    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    target, named = {
        "suffix": (tmp_path / "p.xyz", ".xyz"),
        "parent is a file": (tmp_path / "p.png" / "x.png", f"{tmp_path / 'p.png'} is a file"),
        "read-only": None,
    }.get(case) or _unwritable(tmp_path)
    res = sharpen(tmp_path / "p.png", "-o", target, models=models)
    assert res.exit_code == 1
    assert str(named) in res.stderr and "Traceback" not in res.output
    assert "model:" not in res.output, "inference started before the output was checked"
    assert ".tmp" not in res.stderr  # no internal temporary name


def test_an_output_created_meanwhile_is_kept(tmp_path, models):
    """Two runs writing the same name: the later one finds it taken at the last moment and keeps it."""
    from sharpkd.deploy.jobs import plan_jobs
    from sharpkd.deploy.models import load_model
    from sharpkd.deploy.sharpen import sharpen_image
    from sharpkd.errors import UserError

    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    (job,), errors = plan_jobs([(tmp_path / "p.png", None)], None, True, overwrite=False, preview=False)
    assert not errors
    job.dst.write_bytes(b"the other run's result")  # after planning, before this run writes
    with pytest.raises(UserError, match="p_sharp.png was created meanwhile.*--overwrite"):
        sharpen_image(load_model(models["onnx"]), job, 64, 8)
    assert job.dst.read_bytes() == b"the other run's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "p_sharp.png"]


@pytest.mark.parametrize("kind", ["onnx", "pth", "pt"])
def test_one_pixel_image_gives_no_warning(tmp_path, models, kind):
    import warnings

    Image.fromarray(noise(1, 1)).save(tmp_path / "one.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "array is not writable" among them
        res = runner.invoke(
            app, ["sharpen", str(tmp_path / "one.png"), "-m", str(models[kind]), "--trust-code"]
        )
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(tmp_path / "one_sharp.png")).shape == (1, 1, 3)


@pytest.mark.parametrize("content", [b"junk", b"", b"PK\x03\x04 truncated zip"])
def test_a_bad_model_file_is_one_line(tmp_path, content):
    (tmp_path / "m.pth").write_bytes(content)
    Image.fromarray(noise(8, 8)).save(tmp_path / "p.png")
    res = runner.invoke(app, ["sharpen", str(tmp_path / "p.png"), "--model", str(tmp_path / "m.pth")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "m.pth: not a sharpkd student checkpoint" in res.stderr and res.stderr.strip().count("\n") == 0


def _smooth_photo(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 90 * np.sin(xx / 5 + k) * np.cos(yy / 7 - k) for k in range(3)], axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def test_greyscale_stays_greyscale_and_is_the_colour_paths_luma(tmp_path, models):
    """A mode-L PNG comes out mode L, no colour fringes; its pixels are the Y channel of what the colour path
    writes for the same image as RGB, within one level."""
    grey = _smooth_photo(70, 90)[..., 1]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    Image.fromarray(grey, "L").convert("RGB").save(tmp_path / "c.png")
    res = sharpen(tmp_path / "g.png", tmp_path / "c.png", models=models)
    assert res.exit_code == 0, res.output
    out, colour = Image.open(tmp_path / "g_sharp.png"), Image.open(tmp_path / "c_sharp.png")
    assert out.mode == "L" and colour.mode == "RGB" and "greyscale" in res.output
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(colour.convert("L"), np.int16))
    assert diff.max() <= 1
    assert not np.array_equal(np.asarray(out), grey)  # it was sharpened


def test_greyscale_with_alpha_and_16_bit_greyscale(tmp_path, models):
    """LA keeps its alpha untouched; 16-bit greyscale (I;16) stays 16-bit greyscale in PNG, becomes 8-bit L in
    JPEG (which has no 16 bits)."""
    grey, alpha = _smooth_photo(30, 40)[..., 0], noise(30, 40, c=1)
    Image.merge("LA", [Image.fromarray(grey, "L"), Image.fromarray(alpha, "L")]).save(tmp_path / "la.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # mode I;16
    res = sharpen(tmp_path / "la.png", tmp_path / "deep.png", models=models)
    assert res.exit_code == 0, res.output
    la = Image.open(tmp_path / "la_sharp.png")
    assert la.mode == "LA" and np.array_equal(np.asarray(la)[..., 1], alpha)
    deep = Image.open(tmp_path / "deep_sharp.png")
    assert deep.mode.startswith("I") and np.asarray(deep).max() > 255
    res = sharpen(tmp_path / "deep.png", "-o", tmp_path / "deep.jpg", models=models)
    assert res.exit_code == 0 and Image.open(tmp_path / "deep.jpg").mode == "L", res.output


def test_python_api_as_a_notebook_uses_it(tmp_path, models):
    """Load once, then sharpen arrays and PIL images in memory and a file on disk."""
    from sharpkd.deploy import load_model, sharpen_array, sharpen_file

    model = load_model(models["onnx"])
    assert model.scale == 2 and model.input_type == "float32" and model.verification.sha256
    photo = _smooth_photo(50, 300)  # wider than a tile
    sharp = sharpen_array(photo, model, tile=64, overlap=8)
    assert sharp.shape == photo.shape and sharp.dtype == np.uint8 and not np.array_equal(sharp, photo)
    Image.fromarray(photo).save(tmp_path / "p.png")
    # The same pixels as `sharpkd sharpen` writes with the same tiling.
    assert sharpen(tmp_path / "p.png", "--tile", 64, "--overlap", 8, models=models).exit_code == 0
    assert np.array_equal(sharp, np.asarray(Image.open(tmp_path / "p_sharp.png")))
    rgba = sharpen_array(Image.fromarray(np.dstack([photo, photo[..., 0]]), "RGBA"), model)
    assert rgba.mode == "RGBA" and np.array_equal(np.asarray(rgba)[..., 3], photo[..., 0])
    grey16 = sharpen_array(photo[..., 0].astype(np.uint16) * 257, model)
    assert grey16.dtype == np.uint16 and grey16.ndim == 2
    out = sharpen_file(tmp_path / "p.png", tmp_path / "api.png", models["onnx"])
    assert out == tmp_path / "api.png" and Image.open(out).size == (300, 50)
