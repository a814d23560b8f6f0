"""The extra evaluation sets (eval.sets): HR folders, degraded as the pipeline degrades its validation
split, seeded per image so the numbers repeat. Used by the evaluate stage and by export's INT8 check."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sharpkd.config import DegradationParams
from sharpkd.data.degradation import crop_to_multiple, degrade_image
from sharpkd.deploy.images import ImageReadError, list_images, printable, read_rgb


@dataclass
class EvalImage:
    name: str
    hr: np.ndarray
    lr: np.ndarray  # clean LR (what the teacher sees)
    input: np.ndarray  # degraded full-size image (what the student sees; the bicubic baseline)
    teacher: np.ndarray | None = None  # cached teacher output (validation split only)


def too_small(img: np.ndarray, min_side: int, scale: int) -> str | None:
    h, w = img.shape[:2]
    if min(h, w) < min_side:
        return (
            f"{w}x{h} (cropped to a multiple of data.scale={scale}) is smaller than the {min_side} pixels per side "
            f"the metrics need at scale {scale}"
        )
    return None


def problem(problems: list[str], message: str) -> None:
    """Record a bad input and say so at once (the evaluation goes on without it)."""
    problems.append(message)
    tqdm.write(f"[eval.sets] skipped: {message}")


def image_seed(seed: int, set_name: str, image: str) -> list[int]:
    """Per-image seed of an extra set's degradation: independent of the other images and sets.
    (os.fsencode: the UTF-8 bytes of a name, and the file's own bytes of one that is not UTF-8.)"""
    return [seed, 2, zlib.crc32(set_name.encode()), zlib.crc32(os.fsencode(image))]


def extra_set_images(
    set_name: str,
    folder: str | Path,
    scale: int,
    deg: DegradationParams,
    seed: int,
    min_side: int,
    problems: list[str],
) -> Iterator[EvalImage]:
    """The HR images of one eval.sets folder, degraded; problems are appended to `problems` and skipped."""
    key = f"eval.sets.{set_name}"
    for p in _set_files(key, folder, problems):
        name = p.relative_to(folder).with_suffix("").as_posix()
        try:
            hr = crop_to_multiple(read_rgb(p)[0], scale)
        except ImageReadError as exc:
            problem(problems, f"{key}: {exc}")
            continue
        if why := too_small(hr, min_side, scale):
            problem(problems, f"{key}: {printable(p)}: {why}")
            continue
        lr, degraded, _ = degrade_image(
            hr, scale, deg, np.random.default_rng(image_seed(seed, set_name, name))
        )
        # The name is printed and stored (per_image.csv, eval.json, figure titles): escaped; the seed
        # above is the file's own name.
        yield EvalImage(printable(name), hr, lr, degraded)


def _set_files(key: str, folder: str | Path, problems: list[str]) -> list[Path]:
    """The image files of one eval.sets folder; a missing folder, one without images and each entry
    that cannot be read are problems (the rest is still evaluated)."""
    if not folder:
        problem(problems, f"{key}: no folder given")
        return []
    folder = Path(folder)
    shown = printable(folder)
    if not folder.is_dir():
        problem(
            problems,
            f"{key}: {shown} is not a folder" if folder.exists() else f"{key}: folder {shown} not found",
        )
        return []
    unreadable: list[tuple[Path, str]] = []
    paths = list_images(folder, unreadable)
    for path, why in unreadable:
        problem(problems, f"{key}: {printable(path)}: {why}")
    if not paths:
        problem(problems, f"{key}: no images in {shown}")
    return paths
