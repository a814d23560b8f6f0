"""The one metrics module: pyiqa PSNR / SSIM / LPIPS with the conventions of published SR tables.

PSNR and SSIM: Y channel of YCbCr (BT.601), `scale` pixels of border cropped,
on uint8-rounded images: pyiqa's `color_space='ycbcr'`, `test_y_channel=True`,
`crop_border=scale`. (pyiqa's default color_space 'yiq' reads about 1.3 dB lower.)
LPIPS (AlexNet) needs pretrained weights that pyiqa downloads; when they cannot
be loaded the value is None and `lpips_reason` says why, never a made-up number.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# PSNR of identical images is infinite; JSON has no inf, so it is capped here (and said so).
PSNR_CAP = 100.0


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    if img.dtype != np.uint8:
        raise TypeError(f"metrics expect uint8 images, got {img.dtype}")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div_(255)


class QualityMetrics:
    """Build once, score many: `QualityMetrics(scale).score(output_uint8, reference_uint8)`."""

    def __init__(self, scale: int, lpips: bool = True):
        import pyiqa

        self.scale = scale
        kw = {"test_y_channel": True, "color_space": "ycbcr", "crop_border": scale}
        self._psnr = pyiqa.create_metric("psnr", device="cpu", **kw)
        self._ssim = pyiqa.create_metric("ssim", device="cpu", **kw)
        self._lpips = None
        self.lpips_reason: str | None = "LPIPS not requested (eval.lpips: false)"
        if lpips:
            try:
                self._lpips = pyiqa.create_metric("lpips", device="cpu")
                self.lpips_reason = None
            except Exception as exc:  # no network and no cached weights, most often
                self.lpips_reason = f"LPIPS weights could not be loaded: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"[metrics] LPIPS recorded as null: {self.lpips_reason}")

    @torch.no_grad()
    def score(self, out: np.ndarray, ref: np.ndarray) -> dict:
        if out.shape != ref.shape:
            raise ValueError(f"output {out.shape} and reference {ref.shape} differ in size")
        a, b = _to_tensor(out), _to_tensor(ref)
        psnr = float(self._psnr(a, b))
        lpips = float(self._lpips(a, b)) if self._lpips is not None else None
        return {
            "psnr": PSNR_CAP if not math.isfinite(psnr) else min(psnr, PSNR_CAP),
            "ssim": float(self._ssim(a, b)),
            "lpips": lpips,
        }
