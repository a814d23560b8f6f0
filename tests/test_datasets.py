"""Training crops (data/datasets.py) from whole images: alignment, teacher-only inputs, purity, DDP shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from helpers import NullTracker, run_download, stage_paths, tiny_params
from sharpkd.data.datasets import TrainPatches, teacher_only_count
from sharpkd.data.degradation import center_crop, crop_to_multiple, resize
from sharpkd.deploy.images import read_rgb
from sharpkd.errors import UserError

ALL_OFF = {"jpeg_prob": 0.0, "blur_prob": 0.0, "noise_prob": 0.0}
KEYS = ("hr", "lr", "input", "teacher", "feat")


class CoordTeacher(nn.Module):
    """A teacher whose output is its input repeated s x s (nearest) and whose features are its input:
    any misplaced crop of its output or features shows against the LR crop."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale
        self.feat = nn.Identity()

    def forward(self, x):
        return F.interpolate(self.feat(x), scale_factor=self.scale, mode="nearest")


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Texture with no repeats: every shift of a crop changes its content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 3.0 + yy / 5.0)], axis=2)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _pipeline(root: Path, scale: int, patch: int, monkeypatch) -> tuple[Path, object]:
    """Real download (folder) + degrade with teacher-only inputs + cache_teacher with the coordinate teacher."""
    from sharpkd.models import teacher_loader as teacher_models
    from stages import cache_teacher, degrade

    src = root / "src"
    for sub, sizes in (("train", [(151, 133), (100, 170)]), ("valid", [(40, 44)])):
        (src / sub).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(_photo(h, w, i + 10 * (sub == "valid"))).save(src / sub / f"{sub[0]}{i}.png")
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    Image.fromarray(_photo(37, 29, 5)).save(unlabeled / "u0.png")
    params = tiny_params(
        data={
            "source": "folder",
            "folder": {"train": str(src / "train"), "valid": str(src / "valid")},
            "scale": scale,
            "min_side": patch,
            "patch_size": patch,
            "teacher_only": {"folder": str(unlabeled), "upcycle": ["zoom_in", "zoom_out"], "max_side": 0},
        },
        degradation=ALL_OFF,
        teacher={"feature_channels": 0},
        distill={"teacher_only_fraction": 0.5},
        infer={"tile": 32, "overlap": 8},  # several tiles per image: the tiled cache must stay aligned
    )
    paths = stage_paths(root)
    run_download(params, paths.raw)
    degrade.run(params, paths, NullTracker())
    paths.teacher.mkdir(parents=True)
    (paths.teacher / "teacher.pth").write_bytes(b"")
    info = {"loader": "coord", "scale": scale, "architecture": "coord", "feature_layers": ["feat"]}
    (paths.teacher / "teacher.json").write_text(json.dumps(info))
    monkeypatch.setitem(
        teacher_models.TEACHER_LOADERS, "coord", lambda path, info: CoordTeacher(info["scale"])
    )
    cache_teacher.run(params, paths, NullTracker())
    return root, params


def _sources(root: Path, params, pairs_dir: Path) -> dict:
    """Every whole image a crop can come from, rebuilt independently of the stages' arrays."""
    import pandas as pd

    s = params.data.scale
    up = params.degradation.upscale
    train = {}
    for name in ("t0", "t1"):
        hr = crop_to_multiple(read_rgb(root / "src" / "train" / f"{name}.png")[0], s)
        lr = resize(hr, (hr.shape[1] // s, hr.shape[0] // s))
        train[name] = {"hr": hr, "lr": lr, "input": resize(lr, hr.shape[1::-1], up)}
    pools = [[], []]
    names = pd.read_csv(pairs_dir / "train_manifest.csv", dtype={"name": str}).name.tolist()
    pools[0] = [train[n] for n in names]
    extra = pd.read_csv(pairs_dir / "teacher_only_manifest.csv", dtype={"name": str})
    for kind, name in zip(extra.kind, extra.name, strict=True):
        if kind == "unlabeled":
            t_in = read_rgb(root / "unlabeled" / name)[0]
        elif kind == "zoom_in":
            t_in = train[name]["hr"]
        else:
            lr = crop_to_multiple(train[name]["lr"], s)
            t_in = resize(lr, (lr.shape[1] // s, lr.shape[0] // s))
        t_in = center_crop(t_in, params.data.teacher_only.max_side)
        pools[1].append({"lr": t_in, "input": resize(t_in, (t_in.shape[1] * s, t_in.shape[0] * s), up)})
    for pool in pools:
        for img in pool:  # the coordinate teacher: nearest-upsampled LR, features = LR
            img["teacher"] = img["lr"].repeat(s, axis=0).repeat(s, axis=1)
            img["feat"] = img["lr"]
    return {"pools": pools, "kinds": extra.kind.tolist()}


def _as_hwc(t: torch.Tensor, key: str) -> np.ndarray:
    a = t.permute(1, 2, 0).numpy()
    return a if key == "feat" else np.round(a * 255).astype(np.uint8)


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """HxWxC, the transform torch.rot90(flip) applies to CxHxW: flip W when k & 4, then k & 3 turns."""
    if k & 4:
        a = a[:, ::-1]
    return np.rot90(a, k & 3, axes=(0, 1))


@pytest.mark.parametrize("scale,patch", [(2, 32), (3, 36), (4, 32)])
def test_crops_aligned_between_hr_input_teacher_and_features(scale, patch, tmp_path, monkeypatch):
    """Each crop of HR, LR, input, teacher output and features is the same box of its whole image, under the
    same transform; an off-by-one (one HR pixel or one LR pixel) in any of them fails, at every scale."""
    root, params = _pipeline(tmp_path, scale, patch, monkeypatch)
    pairs, cache = root / "data" / "pairs", root / "data" / "teacher"
    src = _sources(root, params, pairs)
    assert set(src["kinds"]) == {"unlabeled", "zoom_in", "zoom_out"}
    data = TrainPatches(pairs, cache, keys=KEYS, patch_size=patch, teacher_only_fraction=0.5)
    fn = data.batch_fn(8, seed=1)
    s, q = scale, patch // scale
    seen_pools, seen_flips, shifted_differs = set(), set(), {k: 0 for k in KEYS}
    for step in range(6):
        batch = fn(step)
        assert batch["hr"].shape == batch["input"].shape == batch["teacher"].shape == (8, 3, patch, patch)
        assert batch["lr"].shape == (8, 3, q, q) and batch["feat"].shape == (8, 3, q, q)
        assert batch["labelled"].tolist() == [1.0] * 4 + [0.0] * 4
        for b, (pool, i, ly, lx, k) in enumerate(batch["crop"].tolist()):
            seen_pools.add(pool)
            seen_flips.add(k)
            img = src["pools"][pool][i]
            for key in KEYS:
                got = _as_hwc(batch[key][b], key)
                if key == "hr" and pool == 1:
                    assert not got.any()  # a teacher-only crop has no HR
                    continue
                f = 1 if key in ("lr", "feat") else s
                box = img[key][ly * f : (ly + q) * f, lx * f : (lx + q) * f]
                want = _dihedral(box, k)
                if key == "feat":
                    np.testing.assert_allclose(got, want / 255.0, atol=2e-3, err_msg=f"{key} {pool} {i}")
                else:
                    np.testing.assert_array_equal(got, want, err_msg=f"{key} pool {pool} image {i}")
                # The test can see an off-by-one: the box one pixel further is different content.
                moved = img[key][ly * f + 1 : (ly + q) * f + 1, lx * f : (lx + q) * f]
                if moved.shape == box.shape and not np.array_equal(moved, box):
                    shifted_differs[key] += 1
    assert seen_pools == {0, 1} and len(seen_flips) >= 6
    assert all(v > 0 for v in shifted_differs.values()), shifted_differs


def _fake_pairs(
    root: Path, sizes: list[tuple[int, int]], extra: list[tuple[int, int]] = (), scale=2, patch=8
):
    """data/pairs and data/teacher by hand (the on-disk contract): images whose pixels encode (image, y, x)."""
    pairs, cache = root / "pairs", root / "teacher"
    pairs.mkdir(parents=True)
    cache.mkdir()

    def write(folder, name, images):
        np.save(folder / name, np.concatenate([im.ravel() for im in images]))

    def coded(n, h, w, c=3):
        yy, xx = np.mgrid[0:h, 0:w]
        return np.stack([np.full((h, w), n), yy, xx][:c], axis=2).astype(np.uint8)

    rows = [f"{i},im{i},{w},{h}" for i, (h, w) in enumerate(sizes)]
    (pairs / "train_manifest.csv").write_text("index,image,width,height\n" + "\n".join(rows) + "\n")
    hr = [coded(i, h, w) for i, (h, w) in enumerate(sizes)]
    lr = [coded(i, h // scale, w // scale) for i, (h, w) in enumerate(sizes)]
    write(pairs, "train_hr.npy", hr)
    write(pairs, "train_input.npy", hr)
    write(pairs, "train_lr.npy", lr)
    write(cache, "train_out.npy", hr)
    np.save(cache / "train_feat.npy", np.concatenate([a.astype(np.float16).ravel() for a in lr]))
    info = {"scale": scale, "teacher_only_images": len(extra)}
    if extra:
        rows = [f"{j},unlabeled,x{j},x{j},{h},{w}" for j, (h, w) in enumerate(extra)]
        (pairs / "teacher_only_manifest.csv").write_text(
            "index,kind,name,origin,height,width\n" + "\n".join(rows) + "\n"
        )
        t_in = [coded(100 + j, h, w) for j, (h, w) in enumerate(extra)]
        out = [coded(100 + j, h * scale, w * scale) for j, (h, w) in enumerate(extra)]
        write(pairs, "teacher_only_lr.npy", t_in)
        write(pairs, "teacher_only_input.npy", out)
        write(cache, "teacher_only_out.npy", out)
        np.save(cache / "teacher_only_feat.npy", np.concatenate([a.astype(np.float16).ravel() for a in t_in]))
    (pairs / "pairs.json").write_text(json.dumps(info))
    return pairs, cache


def test_batches_are_a_pure_function_of_seed_step_rank(tmp_path):
    pairs, cache = _fake_pairs(tmp_path, [(20, 24), (16, 30), (18, 18)], extra=[(9, 7), (12, 10)])
    keys = ("hr", "lr", "input", "teacher", "feat")
    a = TrainPatches(pairs, cache, keys=keys, patch_size=8, teacher_only_fraction=0.25).batch_fn(8, seed=3)
    b = TrainPatches(pairs, cache, keys=keys, patch_size=8, teacher_only_fraction=0.25).batch_fn(8, seed=3)
    for step in (5, 0, 5, 17):  # any order, any process: the same batch for the same step
        x, y = a(step), b(step)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a(1)["crop"], a(2)["crop"])
    other = TrainPatches(pairs, cache, keys=keys, patch_size=8, teacher_only_fraction=0.25).batch_fn(
        8, seed=4
    )
    assert not torch.equal(a(1)["crop"], other(1)["crop"])
    # 2 of 8 crops are teacher-only (round(8 * 0.25)), the rest labelled; their HR is zeros.
    batch = a(3)
    assert batch["labelled"].tolist() == [1.0] * 6 + [0.0] * 2
    assert (batch["crop"][:, 0] == torch.tensor([0] * 6 + [1] * 2)).all()
    assert batch["hr"][6:].abs().sum() == 0 and batch["hr"][:6].abs().sum() > 0
    assert batch["teacher"][6:].abs().sum() > 0 and batch["feat"][6:].abs().sum() > 0


def test_ddp_ranks_draw_disjoint_images(tmp_path):
    pairs, cache = _fake_pairs(tmp_path, [(16, 16)] * 5, extra=[(8, 8)] * 3)
    seen = {0: set(), 1: set()}
    for rank in (0, 1):
        fn = TrainPatches(
            pairs, cache, keys=("hr", "teacher"), patch_size=8, teacher_only_fraction=0.5
        ).batch_fn(4, seed=0, rank=rank, world=2)
        for step in range(20):
            crop = fn(step)["crop"]
            seen[rank] |= {(int(p), int(i)) for p, i in crop[:, :2]}
            # the image index is written into the HR/teacher pixels: the crop really comes from it
            assert (
                (fn(step)["teacher"][:, 0, 0, 0] * 255).round().long() == crop[:, 1] + 100 * crop[:, 0]
            ).all()
    assert seen[0].isdisjoint(seen[1])
    assert {i % 2 for _, i in seen[0]} == {0} and {i % 2 for _, i in seen[1]} == {1}
    with pytest.raises(UserError, match="3 teacher_only images cannot be shared among 4 processes"):
        TrainPatches(pairs, cache, keys=("teacher",), patch_size=8, teacher_only_fraction=0.5).batch_fn(
            4, seed=0, rank=3, world=4
        )


def test_labelled_only_batches_have_no_mask(tmp_path):
    pairs, _ = _fake_pairs(tmp_path, [(20, 24), (16, 30)])
    batch = TrainPatches(pairs, keys=("hr", "lr"), patch_size=8).batch_fn(4, seed=0)(0)
    assert set(batch) == {"hr", "lr", "crop"} and batch["hr"].shape == (4, 3, 8, 8)
    assert batch["hr"].is_contiguous() and batch["hr"].dtype == torch.float32


def test_teacher_only_count():
    assert teacher_only_count(16, 0.0) == 0
    assert teacher_only_count(16, 0.25) == 4
    assert teacher_only_count(4, 0.01) == 1  # a fraction > 0 gives at least one crop
    assert teacher_only_count(16, 1.0) == 16


def test_misaligned_arrays_are_refused(tmp_path):
    pairs, cache = _fake_pairs(tmp_path, [(20, 24), (16, 30)])
    np.save(pairs / "train_lr.npy", np.zeros(10, np.uint8))
    with pytest.raises(UserError, match="lr holds 10 values"):
        TrainPatches(pairs, keys=("hr", "lr"), patch_size=8)
