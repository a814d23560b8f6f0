"""Scoring models on whole images: used for validation during training and by the evaluate stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sharpkd.infer import tiled_apply, to_image, to_tensor


def run_tiled(
    model: Callable,
    img: np.ndarray,
    scale: int,
    tile: int,
    overlap: int,
    align: int = 1,
    device=None,
    amp=False,
) -> np.ndarray:
    """uint8 image in -> uint8 image out through the shared tiled inference."""
    out = tiled_apply(
        model, to_tensor(img), scale=scale, tile=tile, overlap=overlap, align=align, device=device, amp=amp
    )
    return to_image(out)


def mean_scores(rows: Sequence[dict]) -> dict:
    keys = {k for r in rows for k in r if isinstance(r[k], int | float) or r[k] is None}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals and len(vals) == len(rows) else None
    return out


def validate(
    model: Callable, images, metrics, *, use: str, scale_out: int, tile: int, overlap: int, align: int = 1
) -> dict:
    """Mean PSNR/SSIM of `model` over validation images; `use` picks its input ('lr' for a teacher, 'input' for a student)."""
    device = None
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        device = p.device if p is not None else None
    rows = []
    for im in images:
        out = run_tiled(model, getattr(im, use), scale_out, tile, overlap, align, device=device)
        s = metrics.score(out, im.hr)
        rows.append({"psnr": s["psnr"], "ssim": s["ssim"]})
    return mean_scores(rows)
