"""Degradation: HR -> LR (what the teacher sees) -> degraded full-size image (what the student sees).

Order: downscale by `scale` (PIL's antialiased bicubic, which matches MATLAB's
imresize to 50+ dB on Set5) -> round to uint8 = the LR image -> optional blur,
noise, JPEG on the LR image (what a downscaled, compressed video frame goes
through) -> upscale back to full size. Every random draw comes from the
caller's numpy Generator, so the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from sharpkd.config import DegradationParams, Params
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.images import read_rgb, save_image

KERNELS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize(img: np.ndarray, size: tuple[int, int], kernel: str = "bicubic") -> np.ndarray:
    """Resize HxWx3 uint8 to (width, height), channel by channel in float, rounded to uint8 once."""
    w, h = size
    channels = [
        np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((w, h), KERNELS[kernel]))
        for c in range(img.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2).round(), 0, 255).astype(np.uint8)


def degrade_image(
    hr: np.ndarray, scale: int, deg: DegradationParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(lr uint8, degraded full-size uint8, record of what was drawn). HR sides must be multiples of scale."""
    import albumentations as A

    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not a multiple of scale {scale}")
    lr = resize(hr, (w // scale, h // scale), deg.downscale)
    record = {"jpeg_quality": None, "blur_sigma": 0.0, "noise_sigma": 0.0}
    # Draw every value first (fixed order), so a change to one probability leaves the others' draws alone.
    use_blur, use_noise, use_jpeg = rng.random(3) < (deg.blur_prob, deg.noise_prob, deg.jpeg_prob)
    blur_sigma = float(rng.uniform(*deg.blur_sigma))
    noise_sigma = float(rng.uniform(*deg.noise_sigma))
    quality = int(rng.integers(deg.jpeg_quality[0], deg.jpeg_quality[1] + 1))
    noise = rng.standard_normal(lr.shape).astype(np.float32)

    degraded_lr = lr
    if use_blur:
        # Fixed sigma (both ends of the range equal) keeps albumentations' own RNG out of it.
        blur = A.GaussianBlur(blur_limit=(0, 0), sigma_limit=(blur_sigma, blur_sigma), p=1.0)
        degraded_lr = blur(image=degraded_lr)["image"]
        record["blur_sigma"] = round(blur_sigma, 4)
    if use_noise:
        degraded_lr = np.clip(degraded_lr.astype(np.float32) + noise * noise_sigma, 0, 255).round().astype(np.uint8)
        record["noise_sigma"] = round(noise_sigma, 4)
    if use_jpeg:
        buf = io.BytesIO()
        Image.fromarray(degraded_lr).save(buf, format="JPEG", quality=quality)
        degraded_lr = np.asarray(Image.open(buf).convert("RGB"))
        record["jpeg_quality"] = quality
    degraded = resize(degraded_lr, (w, h), deg.upscale)
    return lr, degraded, record


def crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def center_crop(img: np.ndarray, max_side: int) -> np.ndarray:
    if max_side <= 0:
        return img
    h, w = img.shape[:2]
    th, tw = min(h, max_side), min(w, max_side)
    y, x = (h - th) // 2, (w - tw) // 2
    return img[y : y + th, x : x + tw]


def build_pairs(params: Params, raw_dir="data/raw", out_dir="data/pairs", tracker=None) -> dict:
    """Training patches (memory-mappable arrays) and whole validation images, degraded."""
    raw_dir = Path(raw_dir)
    s, p, per = params.data.scale, params.data.patch_size, params.data.patches_per_image
    manifest_path = raw_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} not found; run `dvc repro download`")
    raw = pd.read_csv(manifest_path)
    train = raw[raw.split == "train"].name.astype(str).tolist()
    valid = raw[raw.split == "valid"].name.astype(str).tolist()
    rng = np.random.default_rng(params.seed)

    usable, skipped = [], []
    for name in train:
        img, _ = read_rgb(raw_dir / "train" / f"{name}.png")
        if min(img.shape[:2]) < p:
            print(f"[degrade] skipped {raw_dir / 'train' / name}.png: {img.shape[1]}x{img.shape[0]} is smaller than data.patch_size={p}")
            skipped.append(name)
        else:
            usable.append(name)
    if not usable:
        raise UserError(f"no training image in {raw_dir / 'train'} is at least data.patch_size={p} pixels on each side")

    n = len(usable) * per
    with atomic_dir(out_dir) as tmp:
        arrays = {
            key: np.lib.format.open_memmap(tmp / f"train_{key}.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
            for key, side in (("hr", p), ("lr", p // s), ("input", p))
        }
        rows = []
        i = 0
        for name in tqdm(usable, desc="degrade: training patches", unit="img"):
            img, _ = read_rgb(raw_dir / "train" / f"{name}.png")
            h, w = img.shape[:2]
            for _ in range(per):
                y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
                hr = img[y : y + p, x : x + p]
                lr, degraded, record = degrade_image(hr, s, params.degradation, rng)
                arrays["hr"][i], arrays["lr"][i], arrays["input"][i] = hr, lr, degraded
                rows.append({"index": i, "image": name, "x": x, "y": y, "size": p, **record})
                i += 1
        for a in arrays.values():
            a.flush()
        del arrays
        pd.DataFrame(rows).to_csv(tmp / "train_manifest.csv", index=False)

        vrows = []
        for j, name in enumerate(tqdm(valid, desc="degrade: validation images", unit="img")):
            img, _ = read_rgb(raw_dir / "valid" / f"{name}.png")
            hr = crop_to_multiple(center_crop(img, params.data.valid_max_side), s)
            if min(hr.shape[:2]) < s:
                print(f"[degrade] skipped validation image {name}: too small for scale {s}")
                continue
            lr, degraded, record = degrade_image(hr, s, params.degradation, np.random.default_rng([params.seed, 1, j]))
            for sub, arr in (("hr", hr), ("lr", lr), ("input", degraded)):
                save_image(tmp / "valid" / sub / f"{name}.png", arr)
            vrows.append({"index": len(vrows), "name": name, "width": hr.shape[1], "height": hr.shape[0], **record})
        if not vrows:
            raise UserError(f"no usable validation image in {raw_dir / 'valid'}")
        pd.DataFrame(vrows).to_csv(tmp / "valid_manifest.csv", index=False)
        summary = {
            "train_patches": n,
            "train_images": len(usable),
            "skipped_small": skipped,
            "valid_images": len(vrows),
            "scale": s,
            "patch_size": p,
            "seed": params.seed,
            "degradation": json.loads(json.dumps(params.degradation.__dict__, default=list)),
        }
        write_json(tmp / "pairs.json", summary)
    print(f"[degrade] {n} training patches from {len(usable)} images ({len(skipped)} skipped), {len(vrows)} validation images")
    if tracker is not None:
        tracker.log_metrics({"degrade.train_patches": n, "degrade.valid_images": len(vrows), "degrade.skipped": len(skipped)})
    return summary
