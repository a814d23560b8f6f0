"""Teacher-only training inputs: images whose only target is the teacher's output (there is no HR).

unlabeled  `data.teacher_only.folder`: a folder (recursive) of low-resolution images that have no
           high-resolution version (a user's own footage); each is a teacher input as it is.
frame      `data.teacher_only.folder`: the video clips in that folder, beside the images: each gives
           `data.teacher_only.frames_per_clip` frames, sampled from `seed` and the clip's name
           (data/footage.py), each a teacher input as it is.
zoom_in    `data.teacher_only.upcycle`: a labelled training image's HR used as the teacher's input (DUKD's
           zoom-in): the teacher's x`scale` output of it is the target.
zoom_out   `data.teacher_only.upcycle`: a labelled training image's clean LR downscaled again by data.scale
           (DUKD's zoom-out): the teacher brings it back to the LR size.

Each teacher input is centre-cropped to `data.teacher_only.max_side` (0 = whole image); the
student's input is the teacher input brought up by `degradation.upscale` to the size of the
teacher's output, with no further degradation. An input with a side under
data.min_side / data.scale cannot give one training crop and is skipped (and listed).
The degrade stage checks the folder before any work, decoding every image and clip once: missing,
empty, or without one readable image or clip of a usable size is a UserError naming it; an
unreadable or too small file among good ones is skipped and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sharpkd.config import Params, TeacherOnlyParams, check_linked_files
from sharpkd.data.degradation import center_crop, crop_to_multiple, resize
from sharpkd.data.footage import CLIP_SUFFIXES, ClipReadError, frame_name, is_clip, sample_clip
from sharpkd.deploy.images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    list_files,
    list_image_folder,
    printable,
    read_rgb,
)
from sharpkd.errors import UserError

KEY = "data.teacher_only.folder"


@dataclass
class UnlabeledScan:
    """The usable inputs of data.teacher_only.folder and what was skipped, with why.

    rows: kind (unlabeled or frame), name, origin (the file), height, width (after the centre crop), and
    for a frame its index in the clip; clips: each used clip's path -> its sampled frame indices."""

    folder: Path
    rows: list[dict] = field(default_factory=list)
    clips: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def skip(self, path: Path, why: str) -> None:
        self.skipped.append(f"{printable(path.relative_to(self.folder).as_posix())}: {why}")
        print(f"[degrade] skipped {printable(path)}: {why}")


def list_footage(folder: Path, unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The image and video files under `folder`, recursing, sorted; a clear error when there are none.
    Entries that cannot be read are skipped (images.list_files), appended to `unreadable`."""
    if not folder.is_dir():
        list_image_folder(folder, KEY)  # raises: the folder is missing, or a file
    suffixes = IMAGE_SUFFIXES | CLIP_SUFFIXES
    unreadable = [] if unreadable is None else unreadable
    files = list_files(folder, suffixes, unreadable)
    if not files:
        why = f"; {len(unreadable)} entries could not be read" if unreadable else ""
        raise UserError(
            f"params: '{KEY}' = {printable(folder)}: no images or clips found (it holds no image or video "
            f"files: {', '.join(sorted(suffixes))}, searched recursively{why})"
        )
    return files


def scan_unlabeled(to: TeacherOnlyParams, lr_side: int, seed: int) -> UnlabeledScan:
    """Every image and clip of data.teacher_only.folder decoded once (sizes, readability, the frames
    sampled from each clip), before any work is done."""
    root = Path(to.folder).expanduser()
    unreadable: list[tuple[Path, str]] = []
    files = list_footage(root, unreadable)
    scan = UnlabeledScan(root)
    for path, why in unreadable:
        scan.skip(path, why)
    for path in files:
        try:
            if is_clip(path):
                _scan_clip(scan, path, to, lr_side, seed)
            else:
                _scan_image(scan, path, to.max_side, lr_side)
        except (ImageReadError, ClipReadError) as exc:
            scan.skip(path, f"unreadable ({exc})")
    if not scan.rows:
        raise UserError(
            f"{KEY}: no usable image or clip in {printable(root)} ({len(files)} files: {'; '.join(scan.skipped[:3])}"
            f"{' ...' if len(scan.skipped) > 3 else ''})"
        )
    return scan


def scan_teacher_only(params: Params) -> UnlabeledScan | None:
    """scan_unlabeled of params' data.teacher_only.folder (None without one), and no file of it a link into
    the held-out folders or the pipeline's outputs (config.check_linked_files)."""
    d, to = params.data, params.data.teacher_only
    if not to.folder:
        return None
    scan = scan_unlabeled(to, d.min_side // d.scale, params.seed)
    check_linked_files(params, KEY, sorted({Path(row["origin"]) for row in scan.rows}))
    return scan


def _too_small(w: int, h: int, lr_side: int) -> str:
    return f"{w}x{h} is smaller than a training crop's data.min_side / data.scale = {lr_side} pixels per side"


def _scan_image(scan: UnlabeledScan, path: Path, max_side: int, lr_side: int) -> None:
    h, w = center_crop(read_rgb(path)[0], max_side).shape[:2]
    if min(h, w) < lr_side:
        scan.skip(path, _too_small(w, h, lr_side))
        return
    name = path.relative_to(scan.folder).as_posix()
    scan.rows.append({"kind": "unlabeled", "name": name, "origin": str(path), "height": h, "width": w})


def _scan_clip(scan: UnlabeledScan, path: Path, to: TeacherOnlyParams, lr_side: int, seed: int) -> None:
    """A clip's sampled frames, each under the same centre crop and size bound as an image."""
    name = path.relative_to(scan.folder).as_posix()
    clip = sample_clip(path, name, to.frames_per_clip, seed)
    kept, small = [], []
    for index, hw in zip(clip.frames, clip.sizes, strict=True):
        h, w = _cropped(hw, to.max_side)
        (small if min(h, w) < lr_side else kept).append((index, h, w))
    if small:
        _, h, w = small[0]
        scan.skip(path, f"{len(small)} of its {len(clip.frames)} sampled frames: {_too_small(w, h, lr_side)}")
    for index, h, w in kept:
        row = {"kind": "frame", "name": frame_name(name, index), "origin": str(path), "height": h, "width": w}
        scan.rows.append({**row, "frame": index})
    if kept:
        scan.clips[str(path)] = tuple(index for index, _, _ in kept)


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
