"""Teacher-only training inputs: images whose only target is the teacher's output (there is no HR).

unlabeled  `data.teacher_only.folder`: a folder (recursive) of low-resolution images that have no
           high-resolution version (a user's own footage); each is a teacher input as it is.
zoom_in    `data.teacher_only.upcycle`: a labelled training image's HR used as the teacher's input (DUKD's
           zoom-in): the teacher's x`scale` output of it is the target.
zoom_out   `data.teacher_only.upcycle`: a labelled training image's clean LR downscaled again by data.scale
           (DUKD's zoom-out): the teacher brings it back to the LR size.

Each teacher input is centre-cropped to `data.teacher_only.max_side` (0 = whole image); the
student's input is the teacher input brought up by `degradation.upscale` to the size of the
teacher's output, with no further degradation. An input with a side under
data.min_side / data.scale cannot give one training crop and is skipped (and listed).
The degrade stage checks the folder before any work: missing, empty, or without one readable
image of a usable size is a UserError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sharpkd.data.degradation import center_crop, crop_to_multiple, resize
from sharpkd.errors import UserError
from sharpkd.images import ImageReadError, list_image_folder, read_rgb


@dataclass
class UnlabeledScan:
    """The usable images of data.teacher_only.folder (relative name, path) and what was skipped, with why."""

    folder: Path
    images: list[tuple[str, Path]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) after the centre crop
    skipped: list[str] = field(default_factory=list)


def scan_unlabeled(folder: str, lr_side: int, max_side: int) -> UnlabeledScan:
    """Every image of the data.teacher_only.folder decoded once (sizes, readability), before any work is done."""
    root = Path(folder).expanduser()
    files = list_image_folder(root, "data.teacher_only.folder")
    scan = UnlabeledScan(root)
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            img, _ = read_rgb(path)
        except ImageReadError as exc:
            scan.skipped.append(f"{name}: unreadable ({exc})")
            print(f"[degrade] skipped {path}: {exc}")
            continue
        h, w = center_crop(img, max_side).shape[:2]
        if min(h, w) < lr_side:
            scan.skipped.append(
                f"{name}: {w}x{h} is smaller than a training crop's {lr_side} pixels per side"
            )
            print(f"[degrade] skipped {path}: {w}x{h} is smaller than data.min_side / data.scale = {lr_side}")
            continue
        scan.images.append((name, path))
        scan.sizes.append((h, w))
    if not scan.images:
        raise UserError(
            f"data.teacher_only.folder: no usable image in {root} ({len(files)} files: {'; '.join(scan.skipped[:3])}"
            f"{' ...' if len(scan.skipped) > 3 else ''})"
        )
    return scan


def unlabeled_input(path: Path, max_side: int) -> np.ndarray:
    return np.ascontiguousarray(center_crop(read_rgb(path)[0], max_side))


def zoom_in_input(hr: np.ndarray, max_side: int) -> np.ndarray:
    """DUKD zoom-in: the HR image itself (centre-cropped) is the teacher's input."""
    return np.ascontiguousarray(center_crop(hr, max_side))


def zoom_out_input(lr: np.ndarray, scale: int, kernel: str, max_side: int) -> np.ndarray:
    """DUKD zoom-out: the clean LR image downscaled again by `scale` (with data's downscale kernel)."""
    lr = crop_to_multiple(lr, scale)
    h, w = lr.shape[:2]
    return np.ascontiguousarray(center_crop(resize(lr, (w // scale, h // scale), kernel), max_side))


def zoom_in_size(hr_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    return _cropped(hr_hw, max_side)


def zoom_out_size(hr_hw: tuple[int, int], scale: int, max_side: int) -> tuple[int, int]:
    h, w = (v // scale for v in hr_hw)
    return _cropped((h // scale, w // scale), max_side)


def _cropped(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    h, w = hw
    return (min(h, max_side), min(w, max_side)) if max_side > 0 else (h, w)


def student_input(teacher_input: np.ndarray, scale: int, kernel: str) -> np.ndarray:
    """What the student sees for a teacher-only input: it brought up by degradation.upscale to the output size."""
    h, w = teacher_input.shape[:2]
    return resize(teacher_input, (w * scale, h * scale), kernel)
