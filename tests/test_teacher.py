"""Teacher stage and teacher-output caching (issue 3)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import SHARED, make_pairs, run_cache_teacher, run_teacher, serve_folder, tiny_params
from sharpkd.data.datasets import TrainPatches
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.models.edsr import EDSR
from sharpkd.models.student import Student
from sharpkd.models.teacher_loader import load_teacher
from sharpkd.tensors import run_tiled, tiled_apply

torch.set_num_threads(1)


def small_swinir(scale: int):
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(
        upscale=scale,
        in_chans=3,
        img_size=16,
        window_size=4,
        img_range=1.0,
        depths=[2],
        embed_dim=12,
        num_heads=[2],
        mlp_ratio=2,
        upsampler="pixelshuffle",
        resi_connection="1conv",
    )


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    make_pairs(root, tiny_params())
    return root


def test_checkpoint_source_loads_spandrel_swinir(pairs, tmp_path):
    ckpt = tmp_path / "swinir_small_x2.pth"
    torch.save({"params": small_swinir(2).state_dict()}, ckpt)
    params = tiny_params(teacher={"source": "checkpoint", "checkpoint": str(ckpt), "feature_channels": 0})
    info = run_teacher(params, pairs / "data/pairs", tmp_path / "teacher")
    assert (
        info["architecture"] == "SwinIR"
        and info["scale"] == 2
        and info["feature_layers"] == ["conv_after_body"]
    )
    assert info["sha256"] == file_digest(ckpt)
    model, _ = load_teacher(tmp_path / "teacher")
    assert model(torch.rand(1, 3, 11, 13)).shape == (1, 3, 22, 26)

    # And the cache works with its features (12 channels on the LR grid).
    out = run_cache_teacher(params, pairs / "data/pairs", tmp_path / "teacher", tmp_path / "cache")
    assert out["feature_channels"] == 12


def test_checkpoint_scale_mismatch_refused(pairs, tmp_path):
    ckpt = tmp_path / "swinir_small_x3.pth"
    torch.save({"params": small_swinir(3).state_dict()}, ckpt)
    params = tiny_params(teacher={"source": "checkpoint", "checkpoint": str(ckpt)})
    with pytest.raises(UserError, match="x3 model but data.scale is 2"):
        run_teacher(params, pairs / "data/pairs", tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()


def test_swinir_source_downloads_and_verifies(pairs, tmp_path, monkeypatch):
    from sharpkd import fetch

    served = tmp_path / "served"
    served.mkdir()
    ckpt = served / "swinir_x2.pth"
    torch.save({"params": small_swinir(2).state_dict()}, ckpt)
    wdir = tmp_path / "weights"
    params = tiny_params(teacher={"source": "swinir", "feature_channels": 0}, weights={"dir": str(wdir)})
    key = "swinir_x2"
    with serve_folder(served) as base:
        monkeypatch.setitem(
            fetch.PRETRAINED, key, {**fetch.PRETRAINED[key], "url": base + ckpt.name, "sha256": "0" * 64}
        )
        with pytest.raises(UserError, match="sha256"):
            run_teacher(params, pairs / "data/pairs", tmp_path / "t1")
        assert not (wdir / fetch.PRETRAINED[key]["filename"]).exists()

        monkeypatch.setitem(
            fetch.PRETRAINED,
            key,
            {**fetch.PRETRAINED[key], "url": base + ckpt.name, "sha256": file_digest(ckpt)},
        )
        info = run_teacher(params, pairs / "data/pairs", tmp_path / "t2")
    assert info["architecture"] == "SwinIR" and info["source"] == "swinir"
    assert (wdir / fetch.PRETRAINED[key]["filename"]).is_file()
    # teacher.json (and the model card) name where the weights come from, not the local folder.
    assert info["origin"] == base + ckpt.name and str(wdir) not in str(info)


def test_trained_teacher_beats_bicubic_and_cache_aligns(pairs, tmp_path):
    from sharpkd.data.datasets import load_valid
    from sharpkd.metrics import QualityMetrics

    # 500 steps: at x2 bicubic is already strong, a shorter run does not reliably beat it.
    params = tiny_params(teacher={"train": {"steps": 500, "channels": 16, "blocks": 2, "lr": 0.003}})
    info = run_teacher(params, pairs / "data/pairs", tmp_path / "teacher")
    assert info["architecture"] == "EDSR-sharpkd" and info["train"]["steps"] == 500

    summary = run_cache_teacher(params, pairs / "data/pairs", tmp_path / "teacher", tmp_path / "cache")
    cache = tmp_path / "cache"
    train = TrainPatches(
        pairs / "data/pairs", cache, keys=("hr", "lr", "teacher", "feat"), patch_size=params.data.patch_size
    ).pools[0]
    manifest = pd.read_csv(pairs / "data/pairs/train_manifest.csv")
    assert len(manifest) == len(train) == summary["train_images"] and summary["train"] is True
    for i in range(len(train)):  # whole images: the output on the HR grid, the features on the LR grid
        assert train.image("teacher", i).shape == train.image("hr", i).shape
        assert train.image("feat", i).shape == (*train.image("lr", i).shape[:2], 4)
    assert np.load(cache / "train_out.npy", mmap_mode="r").dtype == np.uint8
    assert np.load(cache / "train_feat.npy", mmap_mode="r").dtype == np.float16
    assert json.loads((cache / "cache.json").read_text())["complete"] is True

    # Teacher output beats the degraded input on the validation images (bicubic baseline).
    metrics = QualityMetrics(2, lpips=False)
    valid = load_valid(pairs / "data/pairs", cache)
    teacher_psnr = np.mean([metrics.score(v.teacher, v.hr)["psnr"] for v in valid])
    lr_up = [
        np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(v.lr).resize(v.hr.shape[1::-1], 3))
        for v in valid
    ]
    bicubic_psnr = np.mean([metrics.score(b, v.hr)["psnr"] for b, v in zip(lr_up, valid, strict=True)])
    assert teacher_psnr > bicubic_psnr + 0.1, (teacher_psnr, bicubic_psnr)

    # Index alignment: the cached output of image i is the teacher applied (tiled) to LR image i.
    model, _ = load_teacher(tmp_path / "teacher")
    i = len(train) - 1
    again = run_tiled(model, np.array(train.image("lr", i)), 2, params.infer.tile, params.infer.overlap)
    assert np.abs(again.astype(int) - train.image("teacher", i).astype(int)).max() <= 1


def test_cache_size_limit_refused(pairs, tmp_path):
    params = tiny_params(cache={"max_gb": 0.0000001})
    run_teacher(params, pairs / "data/pairs", tmp_path / "teacher")
    with pytest.raises(UserError, match="cache.max_gb"):
        run_cache_teacher(params, pairs / "data/pairs", tmp_path / "teacher", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("shape", [(1, 3, 96, 128), (1, 3, 101, 77)])
def test_tiled_equals_untiled(shape):
    torch.manual_seed(0)
    teacher = EDSR(scale=2, channels=8, blocks=1).eval()  # receptive field 5 LR pixels
    x = torch.rand(shape)
    with torch.no_grad():
        full = teacher(x)
    tiled = tiled_apply(teacher, x, scale=2, tile=48, overlap=24)
    assert tiled.shape == full.shape
    assert (tiled - full).abs().max() < 1e-5

    student = Student(scale=2, channels=8, blocks=1).eval()
    torch.nn.init.normal_(student.tail.weight, std=0.1)
    with torch.no_grad():
        full = student(x)
    tiled = tiled_apply(student, x, scale=1, tile=64, overlap=32, align=2)
    assert (tiled - full).abs().max() < 1e-5


SWINIR_X4 = SHARED / "weights" / "001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth"


@pytest.mark.skipif(
    not SWINIR_X4.is_file(), reason=f"{SWINIR_X4} absent (SwinIR-M weights are not available on this machine)"
)
def test_real_swinir_m_on_set5():
    from sharpkd.data.degradation import degrade_image
    from sharpkd.deploy.images import read_rgb
    from sharpkd.metrics import QualityMetrics
    from sharpkd.models.teacher_loader import load_spandrel

    model, arch, scale = load_spandrel(SWINIR_X4, 4)
    assert arch == "SwinIR" and scale == 4
    hr = read_rgb(SHARED / "testsets/Set5/HR/butterfly.png")[0]
    hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
    params = tiny_params(degradation={"jpeg_prob": 0.0})
    lr, _, _ = degrade_image(hr, 4, params.degradation, np.random.default_rng(0))
    sr = tiled_apply(
        model.eval(), torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255, scale=4, tile=64, overlap=16
    )
    out = sr.clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy()
    assert QualityMetrics(4, lpips=False).score(out, hr)["psnr"] > 30
