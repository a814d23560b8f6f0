"""DVC stage `cache_teacher`: run the teacher once over every training image and teacher-only input.

Writes data/teacher/: for each whole labelled training image and each teacher-only input, the
teacher's output (uint8, image after image in one flat array, aligned with data/pairs) and its
deep features on the LR grid (float16, HxWxC per image, optionally reduced by a fixed PCA
projection fitted once on a seeded sample of crops), both through the one tiled inference path
(inference.tiled_apply), so any image size runs in bounded memory; and its output for each whole
validation image. The size is estimated before anything is written and bounded by cache.max_gb.
With distill.teacher false (the no-teacher baseline) only the validation outputs are made, which
evaluate's teacher row needs: the baseline never waits for a training cache it does not use.
Everything is written into a temporary folder that replaces data/teacher only when complete,
and cache.json is its last file, so a killed run leaves no partial cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sharpkd.config import Params
from sharpkd.data.datasets import PAIR_FILES, TEACHER_FILES, image_sizes, load_valid, read_pairs_info
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.images import save_image, to_image, to_tensor
from sharpkd.inference import default_device, run_tiled, tiled_apply
from sharpkd.models.teacher import load_teacher
from sharpkd.progress import progress
from sharpkd.pipeline import StagePaths, run_stage


class FeatureTap:
    """Captures the outputs of named modules with forward hooks."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        modules = dict(model.named_modules())
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
    m = torch.from_numpy(mean).to(feats).view(1, -1, 1, 1)
    w = torch.from_numpy(comps).to(feats)
    return torch.einsum("kc,bchw->bkhw", w, feats - m)


def estimate_bytes(lr_sizes: np.ndarray, scale: int, feat_channels: int) -> int:
    """Bytes of the cached outputs (uint8 RGB, s x s per LR pixel) and float16 features of images of these LR sizes."""
    pixels = int(np.asarray(lr_sizes, dtype=np.int64).reshape(-1, 2).prod(axis=1).sum())
    return pixels * (scale * scale * 3 + feat_channels * 2)


class TeacherRunner:
    """The teacher on one whole LR image, tiled: (output uint8 HxWx3, LR-grid features float16 hxwxC or None).

    The features ride through tiled_apply beside the output: projected, padded to a multiple of s*s
    channels and pixel-shuffled onto the output grid, blended tile by tile like the output, then
    unshuffled back; each LR position's feature is so a convex blend of the tiles that saw it.
    (tiled_apply's output has as many channels as its input: the input carries empty ones for them.)
    """

    def __init__(self, model, tap, scale: int, params: Params, device, amp: bool):
        self.model, self.tap, self.s = model, tap, scale
        self.tile, self.overlap = params.infer.tile, params.infer.overlap
        self.device, self.amp = device, amp
        self.proj: tuple[np.ndarray, np.ndarray] | None = None
        self.channels = 0

    def raw_features(self, batch: np.ndarray) -> torch.Tensor:
        """Unprojected features of a batch of equal LR crops (B,h,w,3) uint8, untiled (for the PCA fit)."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.model(to_tensor(batch).to(self.device))
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


def _pools(params: Params, pairs_dir: Path, scale: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (flat LR array the teacher sees, (n, 2) LR sizes), for the images distill will draw from."""
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
        pools[kind] = (np.load(path, mmap_mode="r"), image_sizes(pairs_dir, kind, scale))
    return pools


def _image(flat: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, i: int, c: int = 3) -> np.ndarray:
    return flat[offsets[i] : offsets[i + 1]].reshape(int(sizes[i][0]), int(sizes[i][1]), c)


def _offsets(sizes: np.ndarray, per_pixel: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes.prod(axis=1) * per_pixel)]).astype(np.int64)


def _sample_crops(pools, side: int, count: int, seed: int) -> list[np.ndarray]:
    """A seeded sample of LR crops (side x side, smaller where an image is) across all cached images."""
    refs = [(kind, i) for kind, (_, sizes) in pools.items() for i in range(len(sizes))]
    rng = np.random.default_rng(seed)
    crops = []
    for j in rng.integers(0, len(refs), size=count):
        kind, i = refs[j]
        flat, sizes = pools[kind]
        img = _image(flat, _offsets(sizes, 3), sizes, i)
        h, w = img.shape[:2]
        y, x = rng.integers(0, max(1, h - side + 1)), rng.integers(0, max(1, w - side + 1))
        crops.append(np.ascontiguousarray(img[y : y + side, x : x + side]))
    return crops


def run(params: Params, paths: StagePaths, tracker) -> dict:
    pairs_dir, out_dir = Path(paths.pairs), paths.teacher_cache
    device = default_device()
    model, info = load_teacher(paths.teacher, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = device.type == "cuda" and params.compute.amp
    scale = info["scale"]
    pools = _pools(params, pairs_dir, scale)
    layers = list(params.teacher.feature_layers) or list(info.get("feature_layers") or [])
    tap = FeatureTap(model, layers) if (layers and pools) else None
    runner = TeacherRunner(model, tap, scale, params, device, amp)

    # Feature size: probe a small input, then fit the fixed projection on a seeded sample of crops.
    full_channels = 0
    if tap:
        probe = np.zeros((1, 8, 8, 3), np.uint8)
        f = runner.raw_features(probe)
        if f.shape[-2:] != (8, 8):
            raise UserError(
                f"teacher.feature_layers {layers} give features of size {tuple(f.shape[-2:])}, not on the LR grid (8, 8)"
            )
        full_channels = f.shape[1]
    k = params.teacher.feature_channels
    channels = min(k, full_channels) if (k and full_channels) else full_channels
    runner.channels = channels
    sizes = {kind: estimate_bytes(lr_sizes, scale, channels) for kind, (_, lr_sizes) in pools.items()}
    size = sum(sizes.values())
    counts = {kind: len(lr_sizes) for kind, (_, lr_sizes) in pools.items()}
    print(
        f"[cache_teacher] {counts.get('train', 0)} training images, {counts.get('teacher_only', 0)} teacher-only inputs, "
        f"features {full_channels}->{channels} ch: estimated cache {size / 1e9:.3f} GB"
    )
    if size > params.cache.max_gb * 1e9:
        parts = ", ".join(f"{kind} {b / 1e9:.2f} GB" for kind, b in sizes.items())
        raise UserError(
            f"estimated teacher cache {size / 1e9:.2f} GB ({parts}) exceeds cache.max_gb={params.cache.max_gb}; "
            "raise cache.max_gb, lower teacher.feature_channels, or make the teacher-only inputs smaller "
            "(data.teacher_only.max_side, .upcycle, .folder)"
        )
    if tap and channels < full_channels:
        crops = _sample_crops(pools, params.cache.pca_crop, params.cache.pca_crops, params.seed)
        bs = params.cache.batch_size
        feats = []
        for crop_side in sorted({c.shape[:2] for c in crops}):  # equal shapes batch together
            same = [c for c in crops if c.shape[:2] == crop_side]
            feats += [runner.raw_features(np.stack(same[i : i + bs])) for i in range(0, len(same), bs)]
        vectors = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, full_channels) for f in feats])
        runner.proj = fit_pca(vectors, channels)

    summary_pools = {}
    with atomic_dir(out_dir) as tmp:
        t0, pixels = time.perf_counter(), 0
        for kind, (lr_flat, lr_sizes) in pools.items():
            out_sizes = lr_sizes * scale
            outs = np.lib.format.open_memmap(
                tmp / TEACHER_FILES[kind]["teacher"],
                mode="w+",
                dtype=np.uint8,
                shape=(int(out_sizes.prod(axis=1).sum()) * 3,),
            )
            feat_arr = None
            if tap:
                feat_arr = np.lib.format.open_memmap(
                    tmp / TEACHER_FILES[kind]["feat"],
                    mode="w+",
                    dtype=np.float16,
                    shape=(int(lr_sizes.prod(axis=1).sum()) * channels,),
                )
            lr_off, out_off, feat_off = (
                _offsets(lr_sizes, 3),
                _offsets(lr_sizes, 3 * scale * scale),
                _offsets(lr_sizes, channels),
            )
            for i in progress(range(len(lr_sizes)), desc=f"teacher on {kind} images", unit="img"):
                out, f = runner(np.ascontiguousarray(_image(lr_flat, lr_off, lr_sizes, i)))
                outs[out_off[i] : out_off[i + 1]] = out.ravel()
                if feat_arr is not None:
                    feat_arr[feat_off[i] : feat_off[i + 1]] = f.ravel()
            pixels += int(lr_sizes.prod(axis=1).sum())
            outs.flush()
            del outs
            if feat_arr is not None:
                feat_arr.flush()
                del feat_arr
            summary_pools[kind] = {"images": len(lr_sizes), "bytes": sizes[kind]}
        train_s = time.perf_counter() - t0
        if runner.proj is not None:
            np.savez(
                tmp / "feature_projection.npz",
                mean=runner.proj[0],
                components=runner.proj[1],
                layers=np.array(layers),
            )
        if tap:
            tap.close()

        valid = load_valid(pairs_dir)
        t0 = time.perf_counter()
        for im in progress(valid, desc="teacher on validation images", unit="img"):
            out = run_tiled(
                model, im.lr, scale, params.infer.tile, params.infer.overlap, device=device, amp=amp
            )
            save_image(tmp / "valid" / f"{im.name}.png", out)
        valid_s = time.perf_counter() - t0
        summary = {
            "complete": True,
            "train": bool(pools),
            "train_images": counts.get("train", 0),
            "teacher_only_images": counts.get("teacher_only", 0),
            "scale": scale,
            "feature_layers": layers if tap else [],
            "feature_channels": channels,
            "feature_channels_full": full_channels,
            "feature_projection": runner.proj is not None,
            "valid_images": len(valid),
            "device": str(device),
            "lr_pixels_per_s": round(pixels / train_s, 1) if pixels else 0.0,
            "train_seconds": round(train_s, 2),
            "valid_seconds": round(valid_s, 2),
            "bytes": size,
            "pools": summary_pools,
        }
        write_json(tmp / "cache.json", summary)
    print(
        f"[cache_teacher] {summary['lr_pixels_per_s']:.0f} LR pixels/s on {device} ({train_s:.1f}s); "
        f"{len(valid)} validation images in {valid_s:.1f}s"
    )
    tracker.log_metrics({"cache.lr_pixels_per_s": summary["lr_pixels_per_s"], "cache.bytes": size})
    tracker.set_tags({"device": str(device)})
    return summary


if __name__ == "__main__":
    run_stage("cache_teacher", run)
