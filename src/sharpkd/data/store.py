"""The flat image store: many HxWxC images back to back in one flat .npy array (uint8 or float16).

data/pairs and data/teacher keep each quantity of a kind of image (HR, LR, the student's input, the
teacher's output and features) as one 1-D array, row-major HxWxC images one after another in
manifest order (docs/architecture.md); an image's offset is the sum of the sizes before it. The
sizes are not in the array: they come from the manifests, on one grid (the LR grid for the training
pools), and `factor` scales them per side for a quantity on a finer grid (the output grid: x scale).
One flat array instead of one file per image: a single memory map serves every random crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sharpkd.errors import UserError


def image_offsets(sizes, channels: int, factor: int = 1) -> np.ndarray:
    """(n + 1,) int64: where each image of `sizes` (h, w) times `factor` per side starts; last, the total."""
    hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    per_image = hw.prod(axis=1) * (channels * factor * factor)
    return np.concatenate([[0], np.cumsum(per_image)]).astype(np.int64)


class FlatImages:
    """Images of (h, w) `sizes` times `factor` per side, `channels` each, in one flat array."""

    def __init__(self, flat: np.ndarray, sizes, channels: int, factor: int = 1):
        self.flat, self.channels = flat, channels
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2) * factor  # on this array's grid
        self.offsets = image_offsets(self.sizes, channels)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def dtype(self) -> np.dtype:
        return self.flat.dtype

    def view(self, i: int) -> np.ndarray:
        """Image `i` as an HxWxC ndarray over the flat array (no copy)."""
        h, w = (int(v) for v in self.sizes[i])
        # np.asarray: a plain ndarray view, not a memmap slice (cheaper to index per crop).
        return np.asarray(self.flat[self.offsets[i] : self.offsets[i + 1]]).reshape(h, w, self.channels)

    def write(self, i: int, image: np.ndarray) -> None:
        """Store image `i` (HxWxC, exactly its size)."""
        expected = (*(int(v) for v in self.sizes[i]), self.channels)
        if image.shape != expected:
            raise ValueError(f"image {i} is {image.shape}, the store holds {expected} there")
        self.flat[self.offsets[i] : self.offsets[i + 1]] = image.ravel()

    def close(self) -> None:
        """Flush a writable memory map to its file; the store is unusable afterwards."""
        if isinstance(self.flat, np.memmap):
            self.flat.flush()
        self.flat = None


def create(path: str | Path, sizes, channels: int = 3, factor: int = 1, dtype=np.uint8) -> FlatImages:
    """A new .npy file (a writable memory map) sized for images of `sizes` (h, w) times `factor` per side."""
    total = int(image_offsets(sizes, channels, factor)[-1])
    flat = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total,))
    return FlatImages(flat, sizes, channels, factor)


def load_flat(path: str | Path, stage: str) -> np.ndarray:
    """The flat array of a .npy file, memory-mapped read-only. A missing, truncated or damaged file (np.load's
    "mmap length is greater than file size") is a UserError naming it and the `stage` that writes it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path} not found; run `dvc repro {stage}`") from None
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(
            f"{path} cannot be read as a .npy array ({exc}): it is truncated or damaged; "
            f"run `dvc repro -f {stage}`"
        ) from None


def open_images(
    source: str | Path | np.ndarray, sizes, factor: int = 1, channels: int | None = None, what: str = ""
) -> FlatImages:
    """Read-only images of `sizes` (h, w) times `factor` per side: a .npy path (memory-mapped) or flat array.

    `channels` None: they follow from the array's length, which must then be a whole number per pixel
    (a UserError naming `what` otherwise: the array and the manifest giving the sizes do not match).
    A path is read by `load_flat` (data/pairs' arrays: written by degrade).
    """
    flat = load_flat(source, "degrade") if isinstance(source, str | Path) else source
    pixels = int(image_offsets(sizes, 1, factor)[-1])
    if channels is None:
        if flat.ndim != 1 or pixels == 0 or len(flat) % pixels:
            raise UserError(
                f"{what or source} holds {flat.size} values, not a whole number of channels for "
                f"{len(np.asarray(sizes).reshape(-1, 2))} images of {pixels} pixels; "
                "rerun `dvc repro` from degrade"
            )
        channels = len(flat) // pixels
    return FlatImages(flat, sizes, channels, factor)
