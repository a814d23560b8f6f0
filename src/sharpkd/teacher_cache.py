"""The teacher cache: the teacher run once over every training image and teacher-only input -> data/teacher/.

For each whole labelled training image and each teacher-only input, the teacher's output (uint8) and
its deep features on the LR grid (float16, HxWxC per image, optionally reduced by a fixed PCA
projection fitted once on a seeded sample of crops), each kind one flat array aligned with data/pairs
(the flat image store, data/store.py), both through the one tiled inference path
(inference.tiled_apply), so any image size runs in bounded memory; and its output for each whole
validation image. The size is estimated before anything is written and bounded by cache.max_gb.
With distill.teacher false (the no-teacher baseline) only the validation outputs are made, which
evaluate's teacher row needs. The stage (stages/cache_teacher.py) writes all of it into a temporary
folder that replaces data/teacher only when complete, cache.json last; cache.json records the sha256
of every array (`pools.<kind>.sha256`), which distill checks before training (DVC's size-and-mtime
state cache does not see a same-size change that kept the mtime).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sharpkd.config import CacheParams, Params
from sharpkd.data import store
from sharpkd.data.datasets import PAIR_FILES, TEACHER_FILES, image_sizes, load_valid, read_pairs_info
from sharpkd.deploy.images import save_image
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.models.teacher_loader import load_teacher, named_teacher, teacher_name
from sharpkd.progress import progress
from sharpkd.tensors import default_device, run_tiled, tiled_apply, to_image, to_tensor

# A small probe input: the feature layers' channel count, and a check that they lie on the LR grid.
# 16: DCTLSA reflect-pads its input to 16-pixel windows, which an 8-pixel side cannot give.
PROBE_SIDE = 16


class FeatureTap:
    """Captures the outputs of named modules of the named teacher with forward hooks.

    In an ensemble (models.teacher_loader.TeacherEnsemble) they are the named teacher's modules, and its plain
    pass runs last of its passes, so what the hooks hold after a forward is its features of the input."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.root = named_teacher(model)
        modules = dict(self.root.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]
        self.names = names

    def _hook(self, name):
        def hook(_mod, _inp, out):
            self.outputs[name] = out[0] if isinstance(out, tuple) else out

        return hook

    def features(self) -> torch.Tensor:
        return torch.cat([self.outputs[n].float() for n in self.names], dim=1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def fit_pca(vectors: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (C,), components (k, C)) of per-pixel feature vectors (N, C)."""
    x = vectors.double()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean.float().numpy(), v[:k].float().numpy()


def project(feats: torch.Tensor, mean: np.ndarray, comps: np.ndarray) -> torch.Tensor:
    """Features (B, C, h, w) onto the fixed projection: (B, k, h, w)."""
    m = torch.from_numpy(mean).to(feats).view(1, -1, 1, 1)
    w = torch.from_numpy(comps).to(feats)
    return torch.einsum("kc,bchw->bkhw", w, feats - m)


def estimate_bytes(lr_sizes: np.ndarray, scale: int, feat_channels: int) -> int:
    """Bytes of the cached outputs (uint8 RGB, s x s per LR pixel) and float16 features of these LR sizes."""
    pixels = int(np.asarray(lr_sizes, dtype=np.int64).reshape(-1, 2).prod(axis=1).sum())
    return pixels * (scale * scale * 3 + feat_channels * 2)


@dataclass
class Teacher:
    """The loaded teacher and where it runs."""

    model: torch.nn.Module
    info: dict  # teacher.json
    device: torch.device
    amp: bool

    @property
    def scale(self) -> int:
        return self.info["scale"]


def load_cache_teacher(teacher_dir: str | Path, params: Params) -> Teacher:
    device = default_device()
    model, info = load_teacher(teacher_dir, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return Teacher(model, info, device, device.type == "cuda" and params.compute.amp)


class TeacherRunner:
    """The teacher on one whole LR image, tiled: (output uint8 HxWx3, LR-grid features float16 hxwxC or None).

    The features ride through tiled_apply beside the output: projected, padded to a multiple of s*s
    channels and pixel-shuffled onto the output grid, blended tile by tile like the output, then
    unshuffled back; each LR position's feature is so a convex blend of the tiles that saw it.
    (tiled_apply's output has as many channels as its input: the input carries empty ones for them.)
    """

    def __init__(self, model, tap, scale: int, params: Params, device, amp: bool, info: dict):
        self.model, self.tap, self.s = model, tap, scale
        self.name, self.passes = teacher_name(info), info.get("passes", 1)
        self.tile, self.overlap = params.infer.tile, params.infer.overlap
        self.device, self.amp = device, amp
        self.proj: tuple[np.ndarray, np.ndarray] | None = None
        self.channels = 0  # cached feature channels (after the projection)
        self.full_channels = 0  # the feature layers' channels

    @property
    def layers(self) -> list[str]:
        return self.tap.names if self.tap is not None else []

    def raw_features(self, batch: np.ndarray) -> torch.Tensor:
        """Unprojected features of a batch of equal LR crops (B,h,w,3) uint8, untiled (for the PCA fit):
        the named teacher alone runs, not a whole ensemble."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.tap.root(to_tensor(batch).to(self.device))
        return self.tap.features().float().cpu()

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :3]
        out = self.model(x)
        if self.tap is None:
            return out
        f = self.tap.features().float()
        if f.shape[-2:] != x.shape[-2:]:
            raise UserError(
                f"teacher.feature_layers {self.tap.names} give features of size {tuple(f.shape[-2:])}, "
                f"not on the LR grid {tuple(x.shape[-2:])}"
            )
        if self.proj is not None:
            f = project(f, *self.proj)
        s2 = self.s * self.s
        f = F.pad(f, (0, 0, 0, 0, 0, (-f.shape[1]) % s2))
        return torch.cat([out.float(), F.pixel_shuffle(f, self.s)], dim=1)

    def __call__(self, lr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = to_tensor(lr)
        if self.tap is not None:
            packed = -(-self.channels // (self.s * self.s))  # feature channels on the output grid
            x = torch.cat([x, x.new_zeros(1, packed, *x.shape[-2:])], dim=1)
        y = tiled_apply(
            self._packed,
            x,
            scale=self.s,
            tile=self.tile,
            overlap=self.overlap,
            device=self.device,
            amp=self.amp,
        )
        out = to_image(y[:, :3])
        if self.tap is None:
            return out, None
        feat = F.pixel_unshuffle(y[:, 3:], self.s)[0, : self.channels]
        return out, feat.permute(1, 2, 0).numpy().astype(np.float16)

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()


def make_runner(teacher: Teacher, params: Params, with_features: bool) -> TeacherRunner:
    """The runner, tapping teacher.feature_layers (or the arch's default) when features are cached.

    Its channels: the layers' (probed), reduced to teacher.feature_channels where that is fewer.
    """
    layers = list(params.teacher.feature_layers) or list(teacher.info.get("feature_layers") or [])
    tap = FeatureTap(teacher.model, layers) if (layers and with_features) else None
    runner = TeacherRunner(
        teacher.model, tap, teacher.scale, params, teacher.device, teacher.amp, teacher.info
    )
    if tap is not None:
        probe = runner.raw_features(np.zeros((1, PROBE_SIDE, PROBE_SIDE, 3), np.uint8))
        if probe.shape[-2:] != (PROBE_SIDE, PROBE_SIDE):
            raise UserError(
                f"teacher.feature_layers {layers} give features of size {tuple(probe.shape[-2:])}, not on "
                f"the LR grid {(PROBE_SIDE, PROBE_SIDE)}"
            )
        runner.full_channels = probe.shape[1]
    k, full = params.teacher.feature_channels, runner.full_channels
    runner.channels = min(k, full) if (k and full) else full
    return runner


def training_pools(params: Params, pairs_dir: Path, scale: int) -> dict[str, store.FlatImages]:
    """kind -> the LR images the teacher sees, of the images distill draws from (none without a teacher)."""
    if not params.distill.teacher:
        return {}
    info = read_pairs_info(pairs_dir)
    if int(info["scale"]) != scale:
        raise UserError(f"{pairs_dir} holds x{info['scale']} pairs but the teacher is x{scale}")
    kinds = ["train"] + (["teacher_only"] if info.get("teacher_only_images") else [])
    pools = {}
    for kind in kinds:
        path = pairs_dir / PAIR_FILES[kind]["lr"]
        if not path.is_file():
            raise UserError(f"{path} not found; run `dvc repro degrade`")
        pools[kind] = store.open_images(path, image_sizes(pairs_dir, kind, scale), channels=3)
    return pools


def check_cache_size(
    pools: dict[str, store.FlatImages], runner: TeacherRunner, max_gb: float
) -> dict[str, int]:
    """kind -> estimated bytes, said and bounded by cache.max_gb before anything is written."""
    sizes = {kind: estimate_bytes(images.sizes, runner.s, runner.channels) for kind, images in pools.items()}
    size = sum(sizes.values())
    counts = {kind: len(images) for kind, images in pools.items()}
    print(
        f"[cache_teacher] {runner.name}, {runner.passes} teacher passes per tile; "
        f"{counts.get('train', 0)} training images, "
        f"{counts.get('teacher_only', 0)} teacher-only inputs, "
        f"features {runner.full_channels}->{runner.channels} ch: estimated cache {size / 1e9:.3f} GB"
    )
    if size > max_gb * 1e9:
        parts = ", ".join(f"{kind} {b / 1e9:.2f} GB" for kind, b in sizes.items())
        raise UserError(
            f"estimated teacher cache {size / 1e9:.2f} GB ({parts}) exceeds cache.max_gb={max_gb}; "
            "raise cache.max_gb, lower teacher.feature_channels, or make the teacher-only inputs smaller "
            "(data.teacher_only.max_side, .upcycle, .folder)"
        )
    return sizes


def sample_crops(pools: dict[str, store.FlatImages], side: int, count: int, seed: int) -> list[np.ndarray]:
    """A seeded sample of LR crops (side x side, smaller where an image is) across all cached images."""
    refs = [(kind, i) for kind, images in pools.items() for i in range(len(images))]
    rng = np.random.default_rng(seed)
    crops = []
    for j in rng.integers(0, len(refs), size=count):
        kind, i = refs[j]
        img = pools[kind].view(i)
        h, w = img.shape[:2]
        y, x = rng.integers(0, max(1, h - side + 1)), rng.integers(0, max(1, w - side + 1))
        crops.append(np.ascontiguousarray(img[y : y + side, x : x + side]))
    return crops


def fit_projection(
    runner: TeacherRunner, pools: dict[str, store.FlatImages], cache: CacheParams, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed PCA projection of the features to runner.channels, fitted on cache.pca_crops seeded crops."""
    crops = sample_crops(pools, cache.pca_crop, cache.pca_crops, seed)
    bs = cache.batch_size
    feats = []
    for crop_side in sorted({c.shape[:2] for c in crops}):  # equal shapes batch together
        same = [c for c in crops if c.shape[:2] == crop_side]
        feats += [runner.raw_features(np.stack(same[i : i + bs])) for i in range(0, len(same), bs)]
    vectors = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, runner.full_channels) for f in feats])
    return fit_pca(vectors, runner.channels)


def save_projection(path: Path, runner: TeacherRunner) -> None:
    mean, components = runner.proj
    np.savez(path, mean=mean, components=components, layers=np.array(runner.layers))


def cache_pool(tmp: Path, kind: str, lr_images: store.FlatImages, runner: TeacherRunner) -> list[Path]:
    """The teacher's output (output grid) and features (LR grid) of every image of one pool; returns
    the arrays written."""
    paths = [tmp / TEACHER_FILES[kind]["teacher"]]
    outs = store.create(paths[0], lr_images.sizes, factor=runner.s)
    feats = None
    if runner.tap is not None:
        paths.append(tmp / TEACHER_FILES[kind]["feat"])
        feats = store.create(paths[1], lr_images.sizes, runner.channels, dtype=np.float16)
    for i in progress(range(len(lr_images)), desc=f"teacher on {kind} images", unit="img"):
        out, feat = runner(np.ascontiguousarray(lr_images.view(i)))
        outs.write(i, out)
        if feats is not None:
            feats.write(i, feat)
    for written in (outs, feats):
        if written is not None:
            written.close()
    return paths


@dataclass
class TrainingCache:
    pools: dict[str, dict]  # kind -> images, bytes, sha256 (file name -> digest)
    lr_pixels: int
    seconds: float  # the teacher's time, hashing not included
    hash_seconds: float = 0.0

    @property
    def lr_pixels_per_s(self) -> float:
        return round(self.lr_pixels / self.seconds, 1) if self.lr_pixels else 0.0


def cache_training(
    tmp: Path, pools: dict[str, store.FlatImages], runner: TeacherRunner, sizes: dict[str, int]
) -> TrainingCache:
    """Every pool through the teacher, timed (the LR pixels/s the summary reports), and the sha256 of each
    array once it is complete, which distill checks before training (fetch.file_digest, the one hash)."""
    t0, pixels, summary, hashing = time.perf_counter(), 0, {}, 0.0
    for kind, lr_images in pools.items():
        written = cache_pool(tmp, kind, lr_images, runner)
        t1 = time.perf_counter()
        sha256 = {path.name: file_digest(path) for path in written}
        hashing += time.perf_counter() - t1
        pixels += int(lr_images.sizes.prod(axis=1).sum())
        summary[kind] = {"images": len(lr_images), "bytes": sizes[kind], "sha256": sha256}
    return TrainingCache(summary, pixels, time.perf_counter() - t0 - hashing, hashing)


@dataclass
class ValidOutputs:
    images: int
    seconds: float


def cache_validation(tmp: Path, pairs_dir: Path, teacher: Teacher, params: Params) -> ValidOutputs:
    """valid/<name>.png: the teacher's output of each whole validation image (tiled), timed."""
    valid = load_valid(pairs_dir)
    t0 = time.perf_counter()
    for im in progress(valid, desc="teacher on validation images", unit="img"):
        out = run_tiled(
            teacher.model,
            im.lr,
            teacher.scale,
            params.infer.tile,
            params.infer.overlap,
            device=teacher.device,
            amp=teacher.amp,
        )
        save_image(tmp / "valid" / f"{im.name}.png", out)
    return ValidOutputs(len(valid), time.perf_counter() - t0)


def cache_summary(
    teacher: Teacher, runner: TeacherRunner, training: TrainingCache, valid: ValidOutputs, size: int
) -> dict:
    """cache.json: what was cached, how fast, how large; distill and evaluate read it. `teacher`: which
    teacher(s) made it, so distill's cache identity (a resumed checkpoint's) changes with the ensemble."""
    info = teacher.info
    return {
        "complete": True,
        "teacher": {
            "name": teacher_name(info),
            "self_ensemble": bool(info.get("self_ensemble")),
            "members": [
                # .get: a teacher.json written by other tools may lack them (recorded as null)
                {"source": m.get("source"), "sha256": m.get("sha256")}
                for m in [info, *info.get("members", [])]
            ],
            "passes": info.get("passes", 1),
        },
        "train": bool(training.pools),
        "train_images": training.pools.get("train", {}).get("images", 0),
        "teacher_only_images": training.pools.get("teacher_only", {}).get("images", 0),
        "scale": teacher.scale,
        "feature_layers": runner.layers,
        "feature_channels": runner.channels,
        "feature_channels_full": runner.full_channels,
        "feature_projection": runner.proj is not None,
        "valid_images": valid.images,
        "device": str(teacher.device),
        "lr_pixels_per_s": training.lr_pixels_per_s,
        "train_seconds": round(training.seconds, 2),
        "hash_seconds": round(training.hash_seconds, 2),
        "valid_seconds": round(valid.seconds, 2),
        "bytes": size,
        "pools": training.pools,
    }
