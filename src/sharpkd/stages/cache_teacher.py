"""DVC stage `cache_teacher`: run the teacher once over all training and validation inputs.

Writes data/teacher/: the teacher's output for every training LR patch (uint8,
index-aligned with data/pairs/train_*.npy), its deep features on the LR grid
(float16, optionally reduced by a fixed PCA projection fitted once on a sample),
and its output for each whole validation image (tiled inference). Everything is
written into a temporary folder that replaces data/teacher only when complete,
and cache.json is its last file, so a killed run leaves no partial cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sharpkd.config import Params
from sharpkd.data.datasets import load_valid
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.images import save_image, to_tensor
from sharpkd.inference import default_device, run_tiled
from sharpkd.models.teacher import load_teacher
from sharpkd.stages import StagePaths, run_stage


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


def fit_pca(feats: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (C,), components (k, C)) of per-pixel feature vectors."""
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean.float().numpy(), v[:k].float().numpy()


def project(feats: torch.Tensor, mean: np.ndarray, comps: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mean).to(feats).view(1, -1, 1, 1)
    w = torch.from_numpy(comps).to(feats)
    return torch.einsum("kc,bchw->bkhw", w, feats - m)


def estimate_bytes(n: int, patch: int, scale: int, feat_channels: int) -> int:
    lr = patch // scale
    return n * (patch * patch * 3 + feat_channels * lr * lr * 2)


def run(params: Params, paths: StagePaths, tracker) -> dict:
    pairs_dir, out_dir = paths.pairs, paths.teacher_cache
    device = default_device()
    model, info = load_teacher(paths.teacher, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = device.type == "cuda" and params.distill.amp
    scale = info["scale"]
    lr = np.load(Path(pairs_dir) / "train_lr.npy", mmap_mode="r")
    n, h, w, _ = lr.shape
    layers = list(params.teacher.feature_layers) or list(info.get("feature_layers") or [])
    tap = FeatureTap(model, layers) if layers else None
    bs = params.cache.batch_size

    def teacher_on(batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = to_tensor(batch).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        feats = tap.features() if tap else None
        return out.float().clamp_(0, 1).mul_(255).round_().byte().permute(0, 2, 3, 1).cpu(), feats

    # Feature size: probe one batch, then fit the fixed projection on a seeded sample.
    full_channels, proj = 0, None
    if tap:
        _, f = teacher_on(lr[:1])
        if f.shape[-2:] != (h, w):
            raise UserError(
                f"teacher.feature_layers {layers} give features of size {tuple(f.shape[-2:])}, not on the LR grid {(h, w)}"
            )
        full_channels = f.shape[1]
    k = params.teacher.feature_channels
    channels = min(k, full_channels) if (k and full_channels) else full_channels
    size = estimate_bytes(n, h * scale, scale, channels)
    print(
        f"[cache_teacher] {n} patches, features {full_channels}->{channels} ch: estimated cache {size / 1e9:.3f} GB"
    )
    if size > params.cache.max_gb * 1e9:
        raise UserError(
            f"estimated teacher cache {size / 1e9:.2f} GB exceeds cache.max_gb={params.cache.max_gb}; "
            f"raise cache.max_gb, lower teacher.feature_channels, or use fewer patches (data.patches_per_image)"
        )
    if tap and channels < full_channels:
        rng = np.random.default_rng(params.seed)
        sample = np.sort(rng.choice(n, size=min(n, 256), replace=False))
        feats = torch.cat([teacher_on(lr[sample[i : i + bs]])[1].cpu() for i in range(0, len(sample), bs)])
        proj = fit_pca(feats, channels)

    with atomic_dir(out_dir) as tmp:
        outs = np.lib.format.open_memmap(
            tmp / "train_out.npy", mode="w+", dtype=np.uint8, shape=(n, h * scale, w * scale, 3)
        )
        feat_arr = None
        if tap:
            feat_arr = np.lib.format.open_memmap(
                tmp / "train_feat.npy", mode="w+", dtype=np.float16, shape=(n, channels, h, w)
            )
        t0 = time.perf_counter()
        for i in tqdm(range(0, n, bs), desc="teacher on training patches", unit="batch"):
            out, f = teacher_on(lr[i : i + bs])
            outs[i : i + len(out)] = out.numpy()
            if feat_arr is not None:
                f = project(f, *proj) if proj is not None else f
                feat_arr[i : i + len(out)] = f.cpu().numpy().astype(np.float16)
        patches_per_s = n / (time.perf_counter() - t0)
        outs.flush()
        del outs
        if feat_arr is not None:
            feat_arr.flush()
            del feat_arr
        if proj is not None:
            np.savez(
                tmp / "feature_projection.npz", mean=proj[0], components=proj[1], layers=np.array(layers)
            )
        if tap:
            tap.close()

        valid = load_valid(pairs_dir)
        t0 = time.perf_counter()
        for im in tqdm(valid, desc="teacher on validation images", unit="img"):
            out = run_tiled(
                model, im.lr, scale, params.infer.tile, params.infer.overlap, device=device, amp=amp
            )
            save_image(tmp / "valid" / f"{im.name}.png", out)
        valid_s = time.perf_counter() - t0
        summary = {
            "complete": True,
            "patches": n,
            "patch_size": h * scale,
            "scale": scale,
            "feature_layers": layers,
            "feature_channels": channels,
            "feature_channels_full": full_channels,
            "feature_projection": proj is not None,
            "valid_images": len(valid),
            "device": str(device),
            "patches_per_s": round(patches_per_s, 2),
            "valid_seconds": round(valid_s, 2),
            "bytes": size,
        }
        write_json(tmp / "cache.json", summary)
    print(
        f"[cache_teacher] {patches_per_s:.1f} patches/s on {device}; {len(valid)} validation images in {valid_s:.1f}s"
    )
    tracker.log_metrics({"cache.patches_per_s": patches_per_s, "cache.bytes": size})
    tracker.set_tags({"device": str(device)})
    return summary


if __name__ == "__main__":
    run_stage("cache_teacher", run)
