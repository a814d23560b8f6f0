"""The one inference path: tiled, so any image size runs in bounded memory.

Tiles overlap by `overlap` input pixels; each tile's output is weighted by a
window that ramps linearly across the middle of each strip shared with a
neighbour, so seams blend away and pixels near a tile's edge (which see its
padding) do not count. Tile origins are multiples of `align` (the student's
pixel-unshuffle grid), so tiling never shifts that grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sharpkd.images import to_image, to_tensor

Model = Callable[[torch.Tensor], torch.Tensor]


def _starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // align * align
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def _ramp(length: int, shared_start: int, shared_end: int) -> torch.Tensor:
    """1-D blend weights for a tile sharing `shared_start`/`shared_end` pixels with its neighbours.

    The outer quarter of a shared strip gets weight 0 (those pixels see the tile's
    zero padding), the middle half ramps linearly, so two neighbours' weights sum
    to 1 and a model whose receptive field is under overlap/4 tiles exactly.
    """
    w = torch.ones(length)
    i = torch.arange(length, dtype=torch.float32) + 0.5
    for shared, dist in ((shared_start, i), (shared_end, length - i)):
        if shared > 0:
            dead = shared // 4
            w = torch.minimum(w, ((dist - dead) / max(shared - 2 * dead, 1)).clamp(0, 1))
    return w


@torch.no_grad()
def tiled_apply(
    model: Model,
    x: torch.Tensor,
    scale: int = 1,
    tile: int = 256,
    overlap: int = 16,
    align: int = 1,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Run `model` over `x` (1,C,H,W, any device) tile by tile; returns (1,C,H*scale,W*scale) float32 on x's device.

    `scale` is the output/input size ratio (teacher: data.scale, student: 1).
    """
    device = torch.device(device) if device is not None else x.device
    _, _, h, w = x.shape
    tile = max(align, tile // align * align)
    ys, xs = _starts(h, tile, overlap, align), _starts(w, tile, overlap, align)
    use_amp = amp and device.type == "cuda"

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=use_amp):
            return model(t.to(device)).float().to(x.device)

    if len(ys) == 1 and len(xs) == 1:
        return run(x)
    out = torch.zeros(x.shape[0], x.shape[1], h * scale, w * scale, device=x.device)
    weight = torch.zeros(1, 1, h * scale, w * scale, device=x.device)
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            # The last tile runs to the edge (it may be up to align-1 pixels larger than `tile`).
            y1 = h if yi + 1 == len(ys) else min(y0 + tile, h)
            x1 = w if xi + 1 == len(xs) else min(x0 + tile, w)
            piece = run(x[..., y0:y1, x0:x1])
            # Ramp only over the overlap actually shared with the neighbouring tile.
            top = (ys[yi - 1] + tile - y0) * scale if yi else 0
            bottom = (y1 - ys[yi + 1]) * scale if yi + 1 < len(ys) else 0
            left = (xs[xi - 1] + tile - x0) * scale if xi else 0
            right = (x1 - xs[xi + 1]) * scale if xi + 1 < len(xs) else 0
            wy = _ramp(piece.shape[-2], max(top, 0), max(bottom, 0))
            wx = _ramp(piece.shape[-1], max(left, 0), max(right, 0))
            win = (wy[:, None] * wx[None, :]).to(x.device)
            out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] += piece * win
            weight[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] += win
    return out.div_(weight)


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
    """uint8 image in -> uint8 image out through the tiled inference."""
    out = tiled_apply(
        model, to_tensor(img), scale=scale, tile=tile, overlap=overlap, align=align, device=device, amp=amp
    )
    return to_image(out)


def default_device() -> torch.device:
    """CUDA when there is one (training, the teacher cache), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
