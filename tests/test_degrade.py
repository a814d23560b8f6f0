"""The degrade stage (issue 2, points 6 and 7): bicubic convention, degradations, patches, determinism."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import SHARED, degradation_params, run_degrade, run_download, tiny_params
from sharpkd.data.degradation import (
    apply_degradation,
    center_crop,
    crop_to_multiple,
    degrade_image,
    draw_degradation,
    resize,
)
from sharpkd.deploy.images import read_rgb
from sharpkd.errors import UserError

SET5 = SHARED / "testsets" / "Set5"
ALL_ON = {"jpeg_prob": 1.0, "blur_prob": 1.0, "noise_prob": 1.0}
ALL_OFF = {"jpeg_prob": 0.0, "blur_prob": 0.0, "noise_prob": 0.0}

# train_manifest.csv and valid_manifest.csv: the image, its size and its seeded degradation.
MANIFEST_COLUMNS = [
    "index",
    "name",
    "width",
    "height",
    "jpeg_quality",
    "blur_sigma",
    "noise_sigma",
    "noise_seed",
]


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 5.0 + yy / 7.0)], axis=2)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _set5_pairs():
    hr_files = sorted((SET5 / "HR").glob("*.png"))
    if not hr_files:
        pytest.skip(f"{SET5 / 'HR'} not present (Set5 of ../shared/testsets)")
    return hr_files


# --------------------------------------------------------------------------- the bicubic convention


def test_bicubic_set5_x4_matches_published_baseline():
    """Down- then up-scaling Set5 x4 with our bicubic gives the published 28.42 dB PSNR-Y (within 0.05)."""
    from sharpkd.metrics import QualityMetrics

    metrics = QualityMetrics(4, lpips=False)
    psnrs = []
    for path in _set5_pairs():
        hr = crop_to_multiple(read_rgb(path)[0], 4)
        h, w = hr.shape[:2]
        up = resize(resize(hr, (w // 4, h // 4), "bicubic"), (w, h), "bicubic")
        psnrs.append(metrics.score(up, hr)["psnr"])
    assert len(psnrs) == 5
    assert abs(np.mean(psnrs) - 28.42) <= 0.05, psnrs


def test_bicubic_downscale_matches_matlab_lr():
    """Our (PIL, float) bicubic downscale against MATLAB's imresize LR images: 50-56 dB."""
    psnrs = []
    for path in _set5_pairs():
        lr_path = SET5 / "LR_bicubic" / "X4" / f"{path.stem}x4.png"
        if not lr_path.is_file():
            pytest.skip(f"{lr_path} not present (MATLAB LR images of Set5)")
        hr = crop_to_multiple(read_rgb(path)[0], 4)
        matlab = read_rgb(lr_path)[0]
        ours = resize(hr, (hr.shape[1] // 4, hr.shape[0] // 4), "bicubic")
        assert ours.shape == matlab.shape
        mse = np.mean((ours.astype(np.float64) - matlab) ** 2)
        psnrs.append(10 * np.log10(255**2 / mse))
    assert min(psnrs) > 50 and 50 <= np.mean(psnrs) <= 56, psnrs
    # Bilinear is another kernel: clearly further from MATLAB's bicubic (guards against a silent kernel swap).
    hr = crop_to_multiple(read_rgb(_set5_pairs()[0])[0], 4)
    bil = resize(hr, (hr.shape[1] // 4, hr.shape[0] // 4), "bilinear")
    matlab = read_rgb(SET5 / "LR_bicubic" / "X4" / f"{_set5_pairs()[0].stem}x4.png")[0]
    assert 10 * np.log10(255**2 / np.mean((bil.astype(np.float64) - matlab) ** 2)) < min(psnrs) - 5


# --------------------------------------------------------------------------- one image


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("kernel", ["bicubic", "bilinear"])
def test_degrade_image_shapes(scale, kernel):
    hr = _photo(12 * scale, 10 * scale, 0)
    deg = degradation_params(downscale=kernel, upscale=kernel, **ALL_ON)
    lr, degraded, record = degrade_image(hr, scale, deg, np.random.default_rng(0))
    assert lr.shape == (12, 10, 3) and degraded.shape == hr.shape
    assert lr.dtype == degraded.dtype == np.uint8
    np.testing.assert_array_equal(lr, resize(hr, (10, 12), kernel))  # LR is the clean downscale
    assert not np.array_equal(degraded, resize(lr, (10 * scale, 12 * scale), kernel))  # the input is degraded


def test_degrade_image_needs_a_multiple_of_scale():
    with pytest.raises(ValueError, match="not a multiple of scale 4"):
        degrade_image(_photo(30, 32, 0), 4, degradation_params(), np.random.default_rng(0))


def test_crop_to_multiple():
    assert crop_to_multiple(np.zeros((31, 45, 3)), 4).shape == (28, 44, 3)
    assert crop_to_multiple(np.zeros((30, 45, 3)), 3).shape == (30, 45, 3)


def test_kernels_differ():
    hr = _photo(48, 48, 1)
    assert not np.array_equal(resize(hr, (12, 12), "bicubic"), resize(hr, (12, 12), "bilinear"))


def test_draw_degradation_ranges_and_probabilities():
    on = degradation_params(jpeg_quality=(40, 60), blur_sigma=(0.5, 0.7), noise_sigma=(2.0, 3.0), **ALL_ON)
    rng = np.random.default_rng(3)
    for _ in range(50):
        r = draw_degradation(on, rng)
        assert (
            40 <= r["jpeg_quality"] <= 60 and 0.5 <= r["blur_sigma"] <= 0.7 and 2.0 <= r["noise_sigma"] <= 3.0
        )
        assert isinstance(r["noise_seed"], int)
    off = draw_degradation(degradation_params(**ALL_OFF), rng)
    assert off == {"jpeg_quality": None, "blur_sigma": 0.0, "noise_sigma": 0.0, "noise_seed": None}
    # Probabilities are probabilities: about half of the draws use JPEG at jpeg_prob 0.5.
    half = degradation_params(jpeg_prob=0.5, blur_prob=0.0, noise_prob=0.0)
    used = sum(draw_degradation(half, rng)["jpeg_quality"] is not None for _ in range(400))
    assert 150 < used < 250


def test_each_degradation_does_what_it_says():
    flat = np.full((64, 64, 3), 128, np.uint8)
    base = {"jpeg_quality": None, "blur_sigma": 0.0, "noise_sigma": 0.0, "noise_seed": None}
    np.testing.assert_array_equal(apply_degradation(flat, base), flat)  # nothing drawn, nothing done
    # Noise: sigma in 0-255 units, per pixel and channel, zero mean.
    noisy = apply_degradation(flat, {**base, "noise_sigma": 4.0, "noise_seed": 11}).astype(np.float64) - 128
    assert abs(noisy.std() - 4.0) < 0.3 and abs(noisy.mean()) < 0.3
    # Blur: a sharp edge gets softer, more so for a larger sigma.
    edge = np.zeros((32, 32, 3), np.uint8)
    edge[:, 16:] = 255
    soft = [apply_degradation(edge, {**base, "blur_sigma": s})[0, 13:19, 0].astype(int) for s in (0.5, 1.5)]
    assert 0 < soft[0][2] < 128 and soft[1][2] > soft[0][2]
    # JPEG: lower quality, larger error; and it is the JPEG of the RGB image (as PIL writes it), not of BGR.
    img = _photo(64, 64, 2)
    errs = [
        np.abs(apply_degradation(img, {**base, "jpeg_quality": q}).astype(int) - img).mean() for q in (95, 30)
    ]
    assert 0 < errs[0] < errs[1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80)
    pil = np.asarray(Image.open(buf)).astype(int)
    # Identical with today's wheels; the margin allows another libjpeg build (the BGR mistake reads about 4).
    assert np.abs(apply_degradation(img, {**base, "jpeg_quality": 80}) - pil).mean() < 0.5


def test_albumentations_global_rng_does_not_leak():
    """Same record, any state of `random` / `np.random`: the same bytes."""
    deg = degradation_params(**ALL_ON)
    hr = _photo(32, 32, 5)
    outs = set()
    for seed in range(3):
        random.seed(seed)
        np.random.seed(seed)
        lr, degraded, record = degrade_image(hr, 2, deg, np.random.default_rng(42))
        outs.add((lr.tobytes(), degraded.tobytes(), json.dumps(record)))
    assert len(outs) == 1
    _, other, _ = degrade_image(hr, 2, deg, np.random.default_rng(43))
    assert other.tobytes() != next(iter(outs))[1]


# --------------------------------------------------------------------------- the stage's logic


def _raw(root: Path, train_sizes, valid_sizes, names=None) -> Path:
    """data/raw made by the real download stage (folder source) from synthetic photos."""
    src = root / "src"
    names = names or [f"t{i}" for i in range(len(train_sizes))]
    for sub, sizes, stems in (
        ("train", train_sizes, names),
        ("valid", valid_sizes, [f"v{i}" for i in range(len(valid_sizes))]),
    ):
        (src / sub).mkdir(parents=True, exist_ok=True)
        for i, ((h, w), stem) in enumerate(zip(sizes, stems, strict=True)):
            Image.fromarray(_photo(h, w, 100 * (sub == "valid") + i)).save(src / sub / f"{stem}.png")
    params = tiny_params(
        data={"source": "folder", "folder": {"train": str(src / "train"), "valid": str(src / "valid")}}
    )
    run_download(params, root / "raw")
    return root / "raw"


def _params(**deg):
    return tiny_params(seed=3, degradation={**ALL_ON, "jpeg_quality": [60, 90], **deg})


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    # t2 is smaller than the 32-pixel patch; v0 has sides that are not multiples of the scale (2).
    return _raw(tmp_path_factory.mktemp("raw"), [(48, 64), (40, 37), (20, 50)], [(41, 59), (35, 30)])


@pytest.fixture(scope="module")
def pairs(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    summary = run_degrade(_params(), raw, out)
    return out, summary


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _flat_images(out: Path, key: str, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """The whole images stored one after another in a flat train_<key>.npy / teacher_only_<key>.npy."""
    flat = np.load(out / f"{key}.npy", mmap_mode="r")
    assert isinstance(flat, np.memmap) and flat.ndim == 1 and flat.dtype == np.uint8
    assert len(flat) == sum(h * w * 3 for h, w in sizes)
    images, at = [], 0
    for h, w in sizes:
        images.append(np.asarray(flat[at : at + h * w * 3]).reshape(h, w, 3))
        at += h * w * 3
    return images


def _record(row) -> dict:
    return {
        "jpeg_quality": None if pd.isna(row.jpeg_quality) else int(row.jpeg_quality),
        "blur_sigma": row.blur_sigma,
        "noise_sigma": row.noise_sigma,
        "noise_seed": None if pd.isna(row.noise_seed) else int(row.noise_seed),
    }


def test_pairs_layout_and_shapes(pairs, raw):
    out, summary = pairs
    s, p = 2, 32
    assert summary["train_images"] == 2 and summary["skipped_small"] == ["t2"]  # t2 (20x50) is too small
    assert json.loads((out / "pairs.json").read_text()) == summary
    assert summary["scale"] == s and summary["min_side"] == p and summary["seed"] == 3
    assert summary["teacher_only_images"] == 0 and not (out / "teacher_only_manifest.csv").exists()

    man = pd.read_csv(out / "train_manifest.csv", dtype={"name": str})
    assert list(man.columns) == MANIFEST_COLUMNS
    assert man["index"].tolist() == [0, 1] and man.name.tolist() == ["t0", "t1"]
    # Whole images, cropped to a multiple of the scale: t0 48x64 stays, t1 40x37 becomes 40x36.
    assert list(zip(man.height, man.width, strict=True)) == [(48, 64), (40, 36)]
    sizes = list(zip(man.height, man.width, strict=True))
    hr = _flat_images(out, "train_hr", sizes)
    inp = _flat_images(out, "train_input", sizes)
    lr = _flat_images(out, "train_lr", [(h // s, w // s) for h, w in sizes])
    assert summary["train_pixels"] == sum(h * w for h, w in sizes)
    deg = _params().degradation
    for row in man.itertuples():
        i = row.index
        np.testing.assert_array_equal(
            hr[i], read_rgb(raw / "train" / f"{row.name}.png")[0][: row.height, : row.width]
        )
        np.testing.assert_array_equal(lr[i], resize(hr[i], (row.width // s, row.height // s)))
        # The record is the exact degradation: replaying it gives the same bytes.
        record = _record(row)
        np.testing.assert_array_equal(
            inp[i], resize(apply_degradation(lr[i], record), (row.width, row.height), deg.upscale)
        )
        assert 60 <= record["jpeg_quality"] <= 90 and record["noise_seed"] is not None
    # One degradation per image, each drawn from its own seed: the two images got different ones.
    assert man.noise_seed.nunique() == 2
    # The CSV holds integers, not 85.0.
    assert "." not in (out / "train_manifest.csv").read_text().splitlines()[1].split(",")[4]


def test_validation_images(pairs, raw):
    out, summary = pairs
    man = pd.read_csv(out / "valid_manifest.csv", dtype={"name": str})
    assert list(man.columns) == MANIFEST_COLUMNS
    assert man.name.tolist() == ["v0", "v1"] and summary["valid_images"] == 2
    # valid_max_side (96 in TINY) is larger than these: whole images, cropped to a multiple of the scale.
    assert (man.width.tolist(), man.height.tolist()) == ([58, 30], [40, 34])
    for row in man.itertuples():
        hr = read_rgb(out / "valid" / "hr" / f"{row.name}.png")[0]
        lr = read_rgb(out / "valid" / "lr" / f"{row.name}.png")[0]
        inp = read_rgb(out / "valid" / "input" / f"{row.name}.png")[0]
        assert hr.shape == inp.shape == (row.height, row.width, 3) and lr.shape == (
            row.height // 2,
            row.width // 2,
            3,
        )
        np.testing.assert_array_equal(
            hr, read_rgb(raw / "valid" / f"{row.name}.png")[0][: row.height, : row.width]
        )


def test_valid_max_side_center_crops(raw, tmp_path):
    run_degrade(tiny_params(data={"valid_max_side": 20}), raw, tmp_path / "p")
    man = pd.read_csv(tmp_path / "p" / "valid_manifest.csv")
    assert man.width.tolist() == [20, 20] and man.height.tolist() == [20, 20]
    full = read_rgb(raw / "valid" / "v0.png")[0]  # 41x59: the centre 20x20 starts at (10, 19)
    np.testing.assert_array_equal(read_rgb(tmp_path / "p" / "valid" / "hr" / "v0.png")[0], full[10:30, 19:39])


def test_same_seed_same_bytes(pairs, raw, tmp_path):
    out, _ = pairs
    random.seed(99)  # other RNGs in other states must not matter
    np.random.seed(99)
    run_degrade(_params(), raw, tmp_path / "again")
    first, again = _files(out), _files(tmp_path / "again")
    assert first.keys() == again.keys() and first == again
    run_degrade(
        tiny_params(seed=4, degradation={**ALL_ON, "jpeg_quality": [60, 90]}), raw, tmp_path / "other"
    )
    other = _files(tmp_path / "other")
    assert other["train_hr.npy"] == first["train_hr.npy"]  # whole images: the seed draws no crop position
    for key in ("train_input.npy", "train_manifest.csv", "valid/input/v0.png"):
        assert other[key] != first[key], key


def test_scale_4_and_3(raw, tmp_path):
    for scale, patch in ((4, 32), (3, 33)):
        out = tmp_path / f"x{scale}"
        summary = run_degrade(
            tiny_params(data={"scale": scale, "min_side": patch, "patch_size": patch}), raw, out
        )
        assert summary["scale"] == scale and summary["min_side"] == patch
        for name in ("train_manifest.csv", "valid_manifest.csv"):
            man = pd.read_csv(out / name)
            assert (man.width % scale == 0).all() and (man.height % scale == 0).all()
        man = pd.read_csv(out / "train_manifest.csv")
        lr = np.load(out / "train_lr.npy")
        assert len(lr) == sum(
            h // scale * (w // scale) * 3 for h, w in zip(man.height, man.width, strict=True)
        )


def test_small_images_skipped_and_counted(capsys, raw, tmp_path):
    run_degrade(_params(), raw, tmp_path / "p")
    printed = capsys.readouterr().out
    assert f"skipped {raw / 'train' / 't2.png'}: 50x20 is smaller than data.min_side=32" in printed
    assert "(1 skipped)" in printed


def test_all_images_too_small_writes_nothing(raw, tmp_path):
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "pairs.json").write_text("{}")  # an earlier, complete output
    with pytest.raises(UserError) as err:
        run_degrade(tiny_params(data={"min_side": 128}), raw, out)
    assert "data.min_side=128" in str(err.value) and str(raw / "train") in str(err.value)
    assert _files(out) == {"pairs.json": b"{}"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pairs.")]


def test_missing_raw_manifest(tmp_path):
    with pytest.raises(UserError, match=r"manifest.csv not found; run `dvc repro download`"):
        run_degrade(tiny_params(), tmp_path / "raw", tmp_path / "pairs")
    assert not (tmp_path / "pairs").exists()


def test_numeric_names_survive(tmp_path):
    """DIV2K-style names ("0001") stay names through the CSV, not the numbers 1."""
    raw = _raw(tmp_path, [(40, 40), (40, 40)], [(20, 20)], names=["0001", "0002"])
    summary = run_degrade(tiny_params(), raw, tmp_path / "pairs")
    assert summary["train_images"] == 2
    assert pd.read_csv(tmp_path / "pairs" / "train_manifest.csv", dtype={"name": str}).name.tolist() == [
        "0001",
        "0002",
    ]


# --------------------------------------------------------------------------- teacher-only inputs


def _teacher_only_params(folder: Path | str = "", upcycle=("zoom_in", "zoom_out"), max_side=40, **extra):
    return tiny_params(
        seed=3,
        degradation=ALL_OFF,
        data={"teacher_only": {"folder": str(folder), "upcycle": list(upcycle), "max_side": max_side}},
        distill={"teacher_only_fraction": 0.25},
        **extra,
    )


def _unlabeled_folder(root: Path) -> Path:
    """LR images without HR: two usable (one in a subfolder, one JPEG), one too small, one corrupt, one text file."""
    folder = root / "unlabeled"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(_photo(20, 30, 7)).save(folder / "a.png")
    Image.fromarray(_photo(18, 17, 8)).save(folder / "sub" / "b.jpg", quality=90)
    Image.fromarray(_photo(10, 40, 9)).save(folder / "c.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_teacher_only_inputs(raw, tmp_path):
    """Unlabeled images as they are, zoom-in (HR as teacher input), zoom-out (LR downscaled again), each listed."""
    folder = _unlabeled_folder(tmp_path)
    out = tmp_path / "pairs"
    summary = run_degrade(_teacher_only_params(folder), raw, out)
    man = pd.read_csv(out / "teacher_only_manifest.csv", dtype={"name": str})
    assert list(man.columns) == ["index", "kind", "name", "origin", "height", "width"]
    # zoom_out of t0 (LR 24x32 -> 12x16) and t1 (LR 20x18 -> 10x9) is under the 16-pixel LR crop: skipped.
    assert list(zip(man.kind, man.name, strict=True)) == [
        ("unlabeled", "a.png"),
        ("unlabeled", "sub/b.jpg"),
        ("zoom_in", "t0"),
        ("zoom_in", "t1"),
    ]
    assert summary["teacher_only"] == {"unlabeled": 2, "zoom_in": 2} and summary["teacher_only_images"] == 4
    skipped = " ".join(summary["teacher_only_skipped"])
    assert "c.png: 40x10" in skipped and "bad.png: unreadable" in skipped and "zoom_out t0" in skipped
    assert "notes.txt" not in skipped

    sizes = list(zip(man.height, man.width, strict=True))
    t_in = _flat_images(out, "teacher_only_lr", sizes)
    s_in = _flat_images(out, "teacher_only_input", [(2 * h, 2 * w) for h, w in sizes])
    hr = {n: read_rgb(raw / "train" / f"{n}.png")[0] for n in ("t0", "t1")}
    expected = [
        read_rgb(folder / "a.png")[0],
        read_rgb(folder / "sub" / "b.jpg")[0],
        center_crop(hr["t0"][:48, :64], 40),  # max side 40: the centre 40x40 of the HR image
        center_crop(hr["t1"][:40, :36], 40),
    ]
    for got, want, student in zip(t_in, expected, s_in, strict=True):
        np.testing.assert_array_equal(got, want)
        # The student sees the teacher's input brought up by degradation.upscale, nothing else done to it.
        np.testing.assert_array_equal(
            student, resize(want, (want.shape[1] * 2, want.shape[0] * 2), "bicubic")
        )


def test_zoom_out_input(raw, tmp_path):
    out = tmp_path / "pairs"
    params = tiny_params(
        seed=3,
        degradation=ALL_OFF,
        data={"teacher_only": {"upcycle": ["zoom_out"]}, "min_side": 16, "patch_size": 16},
        distill={"teacher_only_fraction": 0.5},
    )
    run_degrade(params, raw, out)
    man = pd.read_csv(out / "teacher_only_manifest.csv", dtype={"name": str})
    # t0: HR 48x64 -> LR 24x32 -> 12x16; t1: HR 40x36 -> LR 20x18 -> 10x9 (at least 8 = 16 / 2 per side)
    assert list(zip(man.name, man.height, man.width, strict=True)) == [("t0", 12, 16), ("t1", 10, 9)]
    t_in = _flat_images(out, "teacher_only_lr", [(12, 16), (10, 9)])
    lr0 = resize(read_rgb(raw / "train" / "t0.png")[0][:48, :64], (32, 24))
    np.testing.assert_array_equal(t_in[0], resize(lr0, (16, 12)))


@pytest.mark.parametrize("case", ["missing", "file", "empty", "unreadable", "too_small"])
def test_bad_unlabeled_folder_fails_before_any_work(case, raw, tmp_path, monkeypatch):
    import sharpkd.data.pairs as stage  # where degrade's work is done

    folder = tmp_path / "footage"
    if case == "file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
        if case == "unreadable":
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        if case == "too_small":
            Image.fromarray(_photo(8, 8, 1)).save(folder / "tiny.png")

    def no_work(*a, **k):
        raise AssertionError("degrade started working before checking data.teacher_only.folder")

    monkeypatch.setattr(stage, "degrade_image", no_work)
    monkeypatch.setattr(stage, "read_rgb", no_work)
    out = tmp_path / "pairs"
    with pytest.raises(UserError) as err:
        run_degrade(_teacher_only_params(folder, upcycle=()), raw, out)
    message = str(err.value)
    assert "data.teacher_only.folder" in message and str(folder) in message, message
    says = {
        "missing": "not found",
        "file": "not a folder",
        "empty": "holds no image or video files",
        "unreadable": "no usable image",
        "too_small": "no usable image",
    }[case]
    assert says in message, message
    assert not out.exists()


def test_teacher_only_size_is_bounded(raw, tmp_path):
    out = tmp_path / "pairs"
    with pytest.raises(UserError) as err:
        run_degrade(_teacher_only_params(upcycle=["zoom_in"], max_side=0, cache={"max_gb": 1e-6}), raw, out)
    message = str(err.value)
    assert "cache.max_gb=1e-06" in message and "data.teacher_only.max_side" in message and "GB" in message
    assert not out.exists()
