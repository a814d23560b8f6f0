"""The one uint8/uint16 <-> float conversion, with one rounding rule.

Into the model: `pixels / peak` in float32 (peak 255 for 8 bits, 65535 for 16). Out of it: `x * peak`,
rounded half to even (np.rint), clipped to [0, peak]. Every path uses these: image files, video frames,
the INT8 model's uint8 boundary, serving, and the pipeline's torch tensors (sharpkd.tensors).
"""

from __future__ import annotations

import numpy as np

PEAK = {8: 255.0, 16: 65535.0}
UINT = {8: np.uint8, 16: np.uint16}


def bits_of(pixels: np.ndarray) -> int:
    """16 for uint16 pixels, else 8."""
    return 16 if pixels.dtype == np.uint16 else 8


def to_float(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 or uint16 pixels (any shape) -> float32 in [0, 1], the same shape (into `out` when given)."""
    peak = np.float32(PEAK[bits_of(pixels)])
    return np.divide(pixels, peak, out=out, dtype=np.float32)


def to_uint(x: np.ndarray, bits: int = 8, in_place: bool = False) -> np.ndarray:
    """float in [0, 1] (any shape) -> uint8 (or uint16 with bits=16): x * peak, rounded half to even, clipped.
    `in_place`: `x` (float32, writeable) may be used as scratch space (saves a copy of a video frame)."""
    peak = np.float32(PEAK[bits])
    y = x if in_place and x.dtype == np.float32 and x.flags.writeable else x.astype(np.float32)
    np.multiply(y, peak, out=y)
    np.rint(y, out=y)
    np.clip(y, 0, peak, out=y)
    return y.astype(UINT[bits])


def image_to_batch(img: np.ndarray) -> np.ndarray:
    """HxWx3 uint8/uint16 -> (1,3,H,W) float32 in [0, 1], contiguous."""
    return to_float(np.ascontiguousarray(img.transpose(2, 0, 1)[None]))


def batch_to_image(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """(1,3,H,W) or (3,H,W) float in [0, 1] -> HxWx3 uint8 (uint16 with bits=16)."""
    chw = x[0] if x.ndim == 4 else x
    return np.ascontiguousarray(to_uint(chw, bits).transpose(1, 2, 0))


# ITU-R BT.601 luma, the weights Pillow's convert("L") uses.
LUMA = (0.299, 0.587, 0.114)


def luma(x: np.ndarray) -> np.ndarray:
    """(1,3,H,W) or (3,H,W) float RGB -> (H,W) float32 luma (Y of BT.601)."""
    r, g, b = (x[0] if x.ndim == 4 else x).astype(np.float32)
    return np.float32(LUMA[0]) * r + np.float32(LUMA[1]) * g + np.float32(LUMA[2]) * b
