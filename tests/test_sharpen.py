"""`sharpkd sharpen` on images (alpha, 16-bit, grayscale, EXIF, bad files, folders, globs) and video."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sharpkd.cli import app
from sharpkd.export import export_onnx, export_torchscript
from sharpkd.images import load_image, to_image, to_tensor
from sharpkd.models.student import Student, save_student

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
    res = runner.invoke(app, ["sharpen", "i.png"])
    assert res.exit_code == 1
    assert "models/export/student.onnx" in res.stderr and "dvc repro export" in res.stderr
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
