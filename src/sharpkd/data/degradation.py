"""Degradation: HR -> LR (what the teacher sees) -> degraded full-size image (what the student sees).

Order: downscale by `scale` (PIL's antialiased bicubic, which matches MATLAB's
imresize to 50+ dB on Set5) -> round to uint8 = the LR image -> optional blur,
noise, JPEG on the LR image through albumentations (what a downscaled, compressed
video frame goes through) -> upscale back to full size. Every random draw comes
from the caller's numpy Generator (albumentations gets fixed parameters and a
drawn seed), so the same seed gives the same bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sharpkd.config import DegradationParams

KERNELS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize(img: np.ndarray, size: tuple[int, int], kernel: str = "bicubic") -> np.ndarray:
    """Resize HxWx3 uint8 to (width, height), channel by channel in float, rounded to uint8 once."""
    w, h = size
    channels = [
        np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((w, h), KERNELS[kernel]))
        for c in range(img.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2).round(), 0, 255).astype(np.uint8)


def draw_degradation(deg: DegradationParams, rng: np.random.Generator) -> dict:
    """The random part of one degradation, drawn from `rng` only: the record the manifests store.

    Every value is drawn, used or not, in a fixed order, so a change to one probability leaves
    the other draws alone. Sigmas are rounded before use so the record is exactly what was applied.
    """
    use_blur, use_noise, use_jpeg = rng.random(3) < (deg.blur_prob, deg.noise_prob, deg.jpeg_prob)
    blur_sigma = round(float(rng.uniform(*deg.blur_sigma)), 4)
    noise_sigma = round(float(rng.uniform(*deg.noise_sigma)), 4)
    quality = int(rng.integers(deg.jpeg_quality[0], deg.jpeg_quality[1] + 1))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    return {
        "jpeg_quality": quality if use_jpeg else None,
        "blur_sigma": blur_sigma if use_blur else 0.0,
        "noise_sigma": noise_sigma if use_noise else 0.0,
        "noise_seed": noise_seed if use_noise else None,
    }


def apply_degradation(lr: np.ndarray, record: dict) -> np.ndarray:
    """Blur, noise, JPEG on the LR image (the order a downscaled, compressed frame goes through), via albumentations.

    Each transform gets fixed parameters from `record`, and the noise transform a seed from it, so
    albumentations' own random state never decides anything: the same record gives the same bytes.
    """
    import albumentations as A

    out = lr
    if record["blur_sigma"]:
        sigma = float(record["blur_sigma"])
        out = A.GaussianBlur(blur_limit=(0, 0), sigma_limit=(sigma, sigma), p=1.0)(image=out)["image"]
    if record["noise_sigma"]:
        std = float(record["noise_sigma"]) / 255.0  # the param is in 0-255 units; albumentations: a fraction
        noise = A.GaussNoise(std_range=(std, std), mean_range=(0.0, 0.0), per_channel=True, p=1.0)
        noise.set_random_seed(int(record["noise_seed"]))
        # On float: on uint8 albumentations truncates the noise toward zero (std 3.6 for sigma 4).
        noisy = noise(image=out.astype(np.float32) / 255.0)["image"]
        out = np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)
    if record["jpeg_quality"] is not None:
        q = int(record["jpeg_quality"])
        jpeg = A.ImageCompression(compression_type="jpeg", quality_range=(q, q), p=1.0)
        # It hands the array to OpenCV, which takes BGR: flip, so luma/chroma are those of a real JPEG of the
        # RGB image (byte-identical to PIL's JPEG), not of a red/blue-swapped one.
        out = jpeg(image=np.ascontiguousarray(out[..., ::-1]))["image"][..., ::-1]
    return np.ascontiguousarray(out)


def degrade_image(
    hr: np.ndarray, scale: int, deg: DegradationParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(lr uint8, degraded full-size uint8, record of what was drawn). HR sides must be multiples of scale."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not a multiple of scale {scale}")
    lr = resize(hr, (w // scale, h // scale), deg.downscale)
    record = draw_degradation(deg, rng)
    degraded = resize(apply_degradation(lr, record), (w, h), deg.upscale)
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
