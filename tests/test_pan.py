"""PAN as a pretrained teacher (teacher.source: pan; issue 8, first part)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import SHARED, make_pairs, run_cache_teacher, run_teacher, serve_folder, tiny_params
from sharpkd import fetch
from sharpkd.data.datasets import TrainPatches
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.models import count_params
from sharpkd.models.pan import DEFAULT_FEATURE_LAYERS, PAN
from sharpkd.models.teacher_loader import load_teacher
from sharpkd.tensors import run_tiled

torch.set_num_threads(1)

WEIGHTS = SHARED / "weights"
SET5 = SHARED / "testsets" / "Set5"


def official(scale: int):
    return WEIGHTS / f"PANx{scale}_DF2K.pth"


def needs(path):
    return pytest.mark.skipif(
        not path.exists(), reason=f"{path} absent (official PAN weights / Set5 not on this machine)"
    )


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pan")
    make_pairs(root, tiny_params())
    return root / "data" / "pairs"


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_official_files_load_strictly(scale):
    path = official(scale)
    if not path.is_file():
        pytest.skip(f"{path} absent (official PAN weights not on this machine)")
    assert file_digest(path) == fetch.PRETRAINED[f"pan_x{scale}"]["sha256"]
    model = PAN(scale=scale)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    assert count_params(model) == (272_419 if scale == 4 else 261_403)
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 9, 7))
    assert out.shape == (1, 3, 9 * scale, 7 * scale)


def test_unsupported_scale_refused():
    with pytest.raises(ValueError, match="scale 2, 3 or 4"):
        PAN(scale=8)


@needs(official(2))
def test_build_teacher_pan_then_cache(pairs, tmp_path):
    params = tiny_params(teacher={"source": "pan"}, weights={"dir": str(WEIGHTS)})
    info = run_teacher(params, pairs, tmp_path / "teacher")
    assert info["architecture"] == "PAN" and info["loader"] == "pan" and info["scale"] == 2
    assert info["params"] == 261_403 and info["feature_layers"] == list(DEFAULT_FEATURE_LAYERS)
    assert info["sha256"] == fetch.PRETRAINED["pan_x2"]["sha256"]

    model, saved = load_teacher(tmp_path / "teacher")
    assert saved == json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert model(torch.rand(1, 3, 10, 12)).shape == (1, 3, 20, 24)

    summary = run_cache_teacher(params, pairs, tmp_path / "teacher", tmp_path / "cache")
    train = TrainPatches(
        pairs, tmp_path / "cache", keys=("lr", "teacher", "feat"), patch_size=params.data.patch_size
    ).pools[0]
    # trunk_conv has 40 channels on the LR grid, PCA-reduced to teacher.feature_channels.
    assert summary["feature_channels_full"] == 40 and summary["feature_channels"] == 4
    lr, out, feat = train.image("lr", 0), train.image("teacher", 0), train.image("feat", 0)
    assert feat.shape == (*lr.shape[:2], 4) and feat.dtype == np.float16
    assert np.isfinite(np.load(tmp_path / "cache" / "train_feat.npy", mmap_mode="r").astype(np.float32)).all()
    assert out.shape == (lr.shape[0] * 2, lr.shape[1] * 2, 3)
    # The cached output of an image is the real PAN applied (tiled) to that LR image.
    again = run_tiled(model, np.array(lr), 2, params.infer.tile, params.infer.overlap)
    assert np.abs(again.astype(int) - out.astype(int)).max() <= 1


def test_pan_source_downloads_and_verifies(pairs, tmp_path, monkeypatch):
    # A random PAN x2 state dict stands in for the official file, so this runs without it.
    served = tmp_path / "served"
    served.mkdir()
    torch.manual_seed(0)
    good = served / "PANx2_DF2K.pth"
    torch.save(PAN(scale=2).state_dict(), good)
    wrong = served / "not_pan.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    wdir = tmp_path / "weights"
    params = tiny_params(teacher={"source": "pan"}, weights={"dir": str(wdir)})
    key, spec = "pan_x2", fetch.PRETRAINED["pan_x2"]

    def build(out):
        return run_teacher(params, pairs, tmp_path / out)

    with serve_folder(served) as base:
        # The pinned sha256 does not match what the server sends: refused, nothing kept.
        monkeypatch.setitem(fetch.PRETRAINED, key, {**spec, "url": base + good.name})
        with pytest.raises(UserError, match="sha256 mismatch"):
            build("t1")
        assert not (wdir / spec["filename"]).exists() and not (tmp_path / "t1").exists()
        assert not list(wdir.glob("*.part"))

        # A file that verifies but is not a PAN state dict: a clear error naming it.
        monkeypatch.setitem(
            fetch.PRETRAINED, key, {**spec, "url": base + wrong.name, "sha256": file_digest(wrong)}
        )
        with pytest.raises(UserError, match="not a PAN x2 state dict"):
            build("t2")
        assert not (tmp_path / "t2").exists()
        (wdir / spec["filename"]).unlink()

        monkeypatch.setitem(
            fetch.PRETRAINED, key, {**spec, "url": base + good.name, "sha256": file_digest(good)}
        )
        info = build("t3")
    assert info["architecture"] == "PAN" and info["source"] == "pan" and info["origin"] == base + good.name
    assert file_digest(wdir / spec["filename"]) == file_digest(good) == info["sha256"]

    # A file already in weights.dir that does not match the pin is refused, not used or replaced.
    monkeypatch.setitem(fetch.PRETRAINED, key, {**spec, "url": base + good.name, "sha256": "0" * 64})
    with pytest.raises(UserError, match=f"{spec['filename']}: sha256 mismatch"):
        build("t4")
    assert file_digest(wdir / spec["filename"]) == file_digest(good)


def set5_x4(lr_source: str) -> tuple[float, float]:
    """Mean Set5 x4 PSNR/SSIM of the official PAN x4, on LR from our degradation or MATLAB's files."""
    from sharpkd.data.degradation import crop_to_multiple, degrade_image
    from sharpkd.deploy.images import list_images, read_rgb
    from sharpkd.metrics import QualityMetrics
    from sharpkd.tensors import tiled_apply, to_image, to_tensor

    model = PAN(scale=4)
    model.load_state_dict(torch.load(official(4), map_location="cpu", weights_only=True), strict=True)
    model.eval()
    deg = tiny_params(degradation={"jpeg_prob": 0.0, "blur_prob": 0.0, "noise_prob": 0.0}).degradation
    metrics = QualityMetrics(4, lpips=False)
    scores = []
    for path in list_images(SET5 / "HR"):
        hr = crop_to_multiple(read_rgb(path)[0], 4)
        if lr_source == "ours":
            lr = degrade_image(hr, 4, deg, np.random.default_rng(0))[0]
        else:
            lr = read_rgb(SET5 / "LR_bicubic" / "X4" / f"{path.stem}x4.png")[0]
        # Set5 LR images are at most 128 px: one tile, so tiling cannot move the numbers.
        out = to_image(tiled_apply(model, to_tensor(lr), scale=4, tile=256, overlap=16))
        s = metrics.score(out, hr)
        scores.append((s["psnr"], s["ssim"]))
    assert len(scores) == 5
    psnr, ssim = np.mean(scores, axis=0)
    return float(psnr), float(ssim)


@needs(official(4))
@needs(SET5 / "HR")
def test_pan_x4_reproduces_published_set5():
    # Published (Zhao et al. 2020, Table): Set5 x4 32.13 dB / 0.8948.
    psnr, ssim = set5_x4("ours")
    assert abs(psnr - 32.13) < 0.05, psnr
    assert abs(ssim - 0.8948) < 0.002, ssim


@needs(official(4))
@needs(SET5 / "LR_bicubic" / "X4")
def test_pan_x4_on_matlab_lr_agrees():
    psnr, ssim = set5_x4("matlab")
    assert abs(psnr - 32.13) < 0.05, psnr
    assert abs(ssim - 0.8948) < 0.002, ssim
