"""The one tiled inference path (NumPy): any image size runs in bounded memory.

Tiles overlap by `overlap` input pixels; each tile's output is weighted by a window that ramps linearly
across the middle of each strip shared with a neighbour, so seams blend away and pixels near a tile's edge
(which see its padding) do not count. Tile origins are multiples of `align` (the student's pixel-unshuffle
grid), so tiling never shifts that grid. All arithmetic is float32, in the order the torch version had,
so outputs did not change when it moved here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sharpkd.errors import UserError

# (B,C,h,w) float32 -> (B,C,h*scale,w*scale) float32
ArrayFn = Callable[[np.ndarray], np.ndarray]
# Images: a tile this small bounds memory at any image size (the pipeline's infer.tile / infer.overlap
# default to the same).
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 16
# Video frames go through the model whole up to 4K; larger ones in LARGE_TILE tiles.
WHOLE_FRAME = 3840 * 2160
LARGE_TILE = 1024


def check_tiling(tile: int | None, overlap: int | None) -> tuple[int, int]:
    """--tile / --overlap, each defaulting to DEFAULT_TILE / DEFAULT_OVERLAP; UserError when out of range."""
    tile = DEFAULT_TILE if tile is None else tile
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    if tile < 16:
        raise UserError(f"--tile must be at least 16, got {tile}")
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap must be at least 0 and smaller than the tile ({tile}), got {overlap}")
    return tile, overlap


def frame_tile(tile: int | None, width: int, height: int) -> int:
    """The tile a video frame goes through the model in: `tile` when given, else the whole frame up to 4K."""
    if tile:
        return tile
    return max(width, height) if width * height <= WHOLE_FRAME else LARGE_TILE


def tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """The origins of the tiles along one side."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // align * align
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def ramp(length: int, shared_start: int, shared_end: int) -> np.ndarray:
    """1-D blend weights for a tile sharing `shared_start`/`shared_end` pixels with its neighbours.

    The outer quarter of a shared strip gets weight 0 (those pixels see the tile's zero padding), the
    middle half ramps linearly, so two neighbours' weights sum to 1 and a model whose receptive field is
    under overlap/4 tiles exactly.
    """
    w = np.ones(length, np.float32)
    i = np.arange(length, dtype=np.float32) + np.float32(0.5)
    for shared, dist in ((shared_start, i), (shared_end, np.float32(length) - i)):
        if shared > 0:
            dead = shared // 4
            step = (dist - np.float32(dead)) / np.float32(max(shared - 2 * dead, 1))
            w = np.minimum(w, np.clip(step, 0, 1))
    return w


def tiled_apply(
    fn: ArrayFn, x: np.ndarray, scale: int = 1, tile: int = 256, overlap: int = 16, align: int = 1
) -> np.ndarray:
    """Run `fn` over `x` ((B,C,H,W) float32) tile by tile; returns (B,C,H*scale,W*scale) float32.
    `scale` is the output/input size ratio (a teacher: its upscale; a sharpening student: 1)."""
    _, _, h, w = x.shape
    tile = max(align, tile // align * align)
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x).astype(np.float32, copy=False)
    out = np.zeros((x.shape[0], x.shape[1], h * scale, w * scale), np.float32)
    weight = np.zeros((1, 1, h * scale, w * scale), np.float32)
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            # The last tile runs to the edge (it may be up to align-1 pixels larger than `tile`).
            y1 = h if yi + 1 == len(ys) else min(y0 + tile, h)
            x1 = w if xi + 1 == len(xs) else min(x0 + tile, w)
            piece = fn(np.ascontiguousarray(x[..., y0:y1, x0:x1])).astype(np.float32, copy=False)
            # Ramp only over the overlap actually shared with the neighbouring tile.
            top = (ys[yi - 1] + tile - y0) * scale if yi else 0
            bottom = (y1 - ys[yi + 1]) * scale if yi + 1 < len(ys) else 0
            left = (xs[xi - 1] + tile - x0) * scale if xi else 0
            right = (x1 - xs[xi + 1]) * scale if xi + 1 < len(xs) else 0
            wy = ramp(piece.shape[-2], max(top, 0), max(bottom, 0))
            wx = ramp(piece.shape[-1], max(left, 0), max(right, 0))
            win = wy[:, None] * wx[None, :]
            out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] += piece * win
            weight[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] += win
    return np.divide(out, weight, out=out)
