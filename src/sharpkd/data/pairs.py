"""The degrade stage's work: data/raw/ -> data/pairs/ (the on-disk contract is in docs/architecture.md).

Labelled training images are kept whole (cropped to a multiple of data.scale): HR, the clean LR the
teacher sees, and the degraded full-size input the student sees, each kind one flat array (the flat
image store, data/store.py), with one seeded degradation per image recorded in the manifest; distill
draws random crops from them at every step. The teacher-only inputs (data/teacher_only.py) have their
own arrays and manifest: the teacher's input and the student's input of each. Validation images are
PNGs. Training images with a side under data.min_side are skipped; the crop size (data.patch_size) is
not read here, so changing it reruns none of the stages that store pixels. Everything is planned
(which images, their sizes, the bytes) before anything is written, so a bad input stops the stage early.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sharpkd.config import Params, flatten
from sharpkd.data import store
from sharpkd.data.degradation import center_crop, crop_to_multiple, degrade_image
from sharpkd.data.footage import ClipFrames
from sharpkd.data.teacher_only import (
    UnlabeledScan,
    student_input,
    unlabeled_input,
    zoom_in_input,
    zoom_in_size,
    zoom_out_input,
    zoom_out_size,
)
from sharpkd.deploy.images import read_rgb, save_image
from sharpkd.errors import UserError
from sharpkd.progress import progress

TEACHER_ONLY_KINDS = ("unlabeled", "frame", "zoom_in", "zoom_out")
TEACHER_ONLY_COLUMNS = ["index", "kind", "name", "origin", "height", "width"]


def image_seed(seed: int, name: str) -> list[int]:
    """The seed of one training image's degradation: independent of the other images."""
    return [seed, 0, zlib.crc32(name.encode())]


@dataclass
class RawImages:
    """data/raw's manifest: the training images (name, width, height) and the validation images' names."""

    folder: Path
    train: pd.DataFrame
    valid: list[str]

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.csv"


def read_raw_manifest(raw_dir: Path) -> RawImages:
    manifest = raw_dir / "manifest.csv"
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; run `dvc repro download`")
    # Names stay strings: DIV2K's "0801" must not become the number 801.
    raw = pd.read_csv(manifest, dtype={"name": str, "split": str}, keep_default_na=False)
    missing = {"split", "name", "width", "height"} - set(raw.columns)
    if missing:
        raise UserError(f"{manifest}: columns {sorted(missing)} missing; run `dvc repro download` again")
    return RawImages(raw_dir, raw[raw.split == "train"], raw[raw.split == "valid"].name.tolist())


@dataclass
class TrainingPlan:
    """The usable training images (manifest order), their HR (h, w) (a multiple of the scale), the skipped."""

    scale: int
    names: list[str] = field(default_factory=list)
    hr_sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def lr_sizes(self) -> list[tuple[int, int]]:
        return [(h // self.scale, w // self.scale) for h, w in self.hr_sizes]


def plan_training(raw: RawImages, scale: int, min_side: int, out_dir: Path) -> TrainingPlan:
    """The training images at least `min_side` on each side (the others are skipped and said so)."""
    plan = TrainingPlan(scale)
    for name, w, h in zip(raw.train.name, raw.train.width, raw.train.height, strict=True):
        if min(w, h) < min_side:
            print(
                f"[degrade] skipped {raw.folder / 'train' / name}.png: {w}x{h} is smaller than "
                f"data.min_side={min_side}"
            )
            plan.skipped.append(name)
        else:
            plan.names.append(name)
            plan.hr_sizes.append((int(h) - int(h) % scale, int(w) - int(w) % scale))
    if not plan.names:
        raise UserError(
            f"no training image in {raw.folder / 'train'} is at least data.min_side={min_side} pixels on "
            f"each side ({len(plan.skipped)} skipped); nothing was written to {out_dir}"
        )
    return plan


@dataclass
class TeacherOnlyPlan:
    """One row per teacher-only input (kind, name, origin, the teacher input's height, width; a clip's
    frame: its index); the skipped; the clips of the folder whose frames are used (path -> indices)."""

    scale: int
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    folder: str = ""  # data.teacher_only.folder as scanned, or ""
    clips: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(r["height"], r["width"]) for r in self.rows]

    @property
    def bytes(self) -> int:
        """The teacher's input and the student's (s x s as large) in data/pairs."""
        return sum(h * w * 3 * (1 + self.scale * self.scale) for h, w in self.sizes)


def plan_teacher_only(params: Params, training: TrainingPlan, scan: UnlabeledScan | None) -> TeacherOnlyPlan:
    """The folder's images and clip frames (as scanned), then each upcycle kind over the training images;
    too small: skipped."""
    d, s = params.data, params.data.scale
    min_lr_side, max_side = d.min_side // s, d.teacher_only.max_side
    plan = TeacherOnlyPlan(s)
    if scan is not None:
        plan.rows, plan.skipped = list(scan.rows), list(scan.skipped)
        plan.folder, plan.clips = str(scan.folder), dict(scan.clips)
    upcycle_skipped = []
    for kind in d.teacher_only.upcycle:
        for name, hw in zip(training.names, training.hr_sizes, strict=True):
            h, w = zoom_in_size(hw, max_side) if kind == "zoom_in" else zoom_out_size(hw, s, max_side)
            if min(h, w) < min_lr_side:
                upcycle_skipped.append(
                    f"{kind} {name}: {w}x{h} is smaller than data.min_side / data.scale = {min_lr_side} "
                    "pixels per side"
                )
                continue
            plan.rows.append({"kind": kind, "name": name, "origin": f"train/{name}", "height": h, "width": w})
    if (d.teacher_only.folder or d.teacher_only.upcycle) and not plan.rows:
        raise UserError(
            f"no teacher-only input has {min_lr_side} LR pixels per side "
            f"(data.min_side={d.min_side} / data.scale={s}, data.teacher_only.max_side={max_side}): "
            f"{'; '.join(upcycle_skipped[:3])}"
        )
    plan.skipped += upcycle_skipped
    return plan


def check_teacher_only_size(plan: TeacherOnlyPlan, max_gb: float, out_dir: Path) -> None:
    """Checked before anything is written: these inputs (and later their teacher outputs) in cache.max_gb."""
    if plan.bytes > max_gb * 1e9:
        raise UserError(
            f"the {len(plan.rows)} teacher-only inputs would take {plan.bytes / 1e9:.2f} GB in {out_dir} "
            f"(and about as much again in the teacher cache), over cache.max_gb={max_gb}; set "
            f"data.teacher_only.max_side (a centre crop of each), use fewer of them, or raise cache.max_gb"
        )


def _row(index: int, name: str, hr: np.ndarray, record: dict) -> dict:
    return {"index": index, "name": name, "width": hr.shape[1], "height": hr.shape[0], **record}


def _write_manifest(path: Path, rows: list[dict]) -> None:
    df = pd.DataFrame(rows)
    for col in ("jpeg_quality", "noise_seed"):  # integers or empty, never 85.0
        df[col] = df[col].astype("Int64")
    df.to_csv(path, index=False)


def write_training(tmp: Path, raw: RawImages, training: TrainingPlan, params: Params) -> None:
    """train_hr / train_input / train_lr.npy and train_manifest.csv: each image degraded from its own seed."""
    s = params.data.scale
    hr_store = store.create(tmp / "train_hr.npy", training.hr_sizes)
    input_store = store.create(tmp / "train_input.npy", training.hr_sizes)
    lr_store = store.create(tmp / "train_lr.npy", training.lr_sizes)
    rows = []
    for i, name in enumerate(progress(training.names, desc="degrade: training images", unit="img")):
        img, _ = read_rgb(raw.folder / "train" / f"{name}.png")
        hr = crop_to_multiple(img, s)
        if hr.shape[:2] != training.hr_sizes[i]:
            raise UserError(
                f"{raw.folder / 'train' / name}.png is {img.shape[1]}x{img.shape[0]}, not what "
                f"{raw.manifest} says; run `dvc repro download` again"
            )
        rng = np.random.default_rng(image_seed(params.seed, name))
        lr, degraded, record = degrade_image(hr, s, params.degradation, rng)
        hr_store.write(i, hr)
        input_store.write(i, degraded)
        lr_store.write(i, lr)
        rows.append(_row(i, name, hr, record))
    _write_manifest(tmp / "train_manifest.csv", rows)
    for written in (hr_store, input_store, lr_store):
        written.close()


def _teacher_input(
    row: dict, train_index: dict[str, int], hr, lr, clips: ClipFrames, params: Params
) -> np.ndarray:
    """The teacher's input of one planned teacher-only row; hr / lr: the training images' stores."""
    max_side = params.data.teacher_only.max_side
    if row["kind"] == "unlabeled":
        return unlabeled_input(row["origin"], max_side)
    if row["kind"] == "frame":
        return clips.frame(row["origin"], row["frame"])
    i = train_index[row["name"]]
    if row["kind"] == "zoom_in":
        return zoom_in_input(hr.view(i), max_side)
    return zoom_out_input(lr.view(i), params.data.scale, params.degradation.downscale, max_side)


def write_teacher_only(tmp: Path, plan: TeacherOnlyPlan, training: TrainingPlan, params: Params) -> None:
    """teacher_only_lr / _input.npy and their manifest; after write_training (zoom-ins read its arrays)."""
    if not plan.rows:
        return
    s = params.data.scale
    hr = store.open_images(tmp / "train_hr.npy", training.hr_sizes, channels=3)
    lr = store.open_images(tmp / "train_lr.npy", training.lr_sizes, channels=3)
    teacher_store = store.create(tmp / "teacher_only_lr.npy", plan.sizes)
    student_store = store.create(tmp / "teacher_only_input.npy", plan.sizes, factor=s)
    train_index = {name: i for i, name in enumerate(training.names)}
    clips = ClipFrames(plan.clips, params.data.teacher_only.max_side)  # one clip's sampled frames at a time
    for j, row in enumerate(progress(plan.rows, desc="degrade: teacher-only inputs", unit="img")):
        t_in = _teacher_input(row, train_index, hr, lr, clips, params)
        if t_in.shape[:2] != (row["height"], row["width"]):
            raise UserError(f"{row['origin']} changed while degrade ran; run `dvc repro degrade` again")
        teacher_store.write(j, t_in)
        student_store.write(j, student_input(t_in, s, params.degradation.upscale))
    rows = [{"index": j, **r} for j, r in enumerate(plan.rows)]
    pd.DataFrame(rows, columns=TEACHER_ONLY_COLUMNS).to_csv(tmp / "teacher_only_manifest.csv", index=False)
    for written in (teacher_store, student_store):
        written.close()


@dataclass
class ValidationImages:
    count: int
    skipped: list[str]


def write_validation(tmp: Path, raw: RawImages, params: Params) -> ValidationImages:
    """valid/{hr,lr,input}/<name>.png and valid_manifest.csv: whole images (centre crop: valid_max_side)."""
    s = params.data.scale
    rows, skipped = [], []
    for j, name in enumerate(progress(raw.valid, desc="degrade: validation images", unit="img")):
        img, _ = read_rgb(raw.folder / "valid" / f"{name}.png")
        hr = crop_to_multiple(center_crop(img, params.data.valid_max_side), s)
        if min(hr.shape[:2]) < s:
            print(
                f"[degrade] skipped {raw.folder / 'valid' / name}.png: {img.shape[1]}x{img.shape[0]} is too "
                f"small for scale {s}"
            )
            skipped.append(name)
            continue
        # Seeded by position (j counts skipped images too), not by name as the training images are.
        rng = np.random.default_rng([params.seed, 1, j])
        lr, degraded, record = degrade_image(hr, s, params.degradation, rng)
        for sub, arr in (("hr", hr), ("lr", lr), ("input", degraded)):
            save_image(tmp / "valid" / sub / f"{name}.png", arr)
        rows.append(_row(len(rows), name, hr, record))
    if not rows:
        raise UserError(f"no usable validation image in {raw.folder / 'valid'}")
    _write_manifest(tmp / "valid_manifest.csv", rows)
    return ValidationImages(len(rows), skipped)


def pairs_summary(
    params: Params, training: TrainingPlan, extra: TeacherOnlyPlan, valid: ValidationImages
) -> dict:
    """pairs.json: counts, pixels, what was skipped, teacher-only inputs, scale, seed (training reads it)."""
    kinds = {k: sum(r["kind"] == k for r in extra.rows) for k in TEACHER_ONLY_KINDS}
    return {
        "train_images": len(training.names),
        "train_pixels": int(sum(h * w for h, w in training.hr_sizes)),
        "skipped_small": training.skipped,
        "skipped_small_valid": valid.skipped,
        "valid_images": valid.count,
        "teacher_only_images": len(extra.rows),
        "teacher_only": {k: v for k, v in kinds.items() if v},
        "teacher_only_skipped": extra.skipped,
        "teacher_only_bytes": extra.bytes,
        "unlabeled_folder": extra.folder,
        "unlabeled_clips": len(extra.clips),
        "scale": params.data.scale,
        "min_side": params.data.min_side,
        "seed": params.seed,
        "degradation": flatten(params.degradation),
    }
