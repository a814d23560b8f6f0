"""DVC stage `degrade`: whole training images and validation images with their degraded versions -> data/pairs/.

Labelled training images are kept whole (cropped to a multiple of data.scale): HR, the clean LR
the teacher sees, and the degraded full-size input the student sees, with one seeded
degradation per image recorded in the manifest; distill draws random crops from them at every
step. The teacher-only inputs (data.teacher_only; data/teacher_only.py) are listed
in their own manifest, with the teacher's input and the student's input for each. The
data.teacher_only.folder is checked first, before any work. Training images with a side under
data.min_side are skipped; the crop size (data.patch_size) is not read here, so changing it reruns
none of the stages that store pixels.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from sharpkd.config import Params, flatten
from sharpkd.data.degradation import center_crop, crop_to_multiple, degrade_image
from sharpkd.data.teacher_only import (
    UnlabeledScan,
    scan_unlabeled,
    student_input,
    unlabeled_input,
    zoom_in_input,
    zoom_in_size,
    zoom_out_input,
    zoom_out_size,
)
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.images import read_rgb, save_image
from sharpkd.progress import progress
from sharpkd.pipeline import StagePaths, run_stage


def _manifest(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("jpeg_quality", "noise_seed"):  # integers or empty, never 85.0
        df[col] = df[col].astype("Int64")
    return df


def image_seed(seed: int, name: str) -> list[int]:
    """The seed of one training image's degradation: independent of the other images."""
    return [seed, 0, zlib.crc32(name.encode())]


def _flat(path, sizes: list[tuple[int, int]], factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A flat uint8 memmap for images of `sizes` (h, w) times `factor` per side, RGB; and each image's offset."""
    per = np.array([h * w * 3 * factor * factor for h, w in sizes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(per)])
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(int(offsets[-1]),))
    return arr, offsets


def _plan_teacher_only(
    params: Params, usable: list[str], hr_sizes: list[tuple[int, int]], scan: UnlabeledScan | None
) -> tuple[list[dict], list[str]]:
    """One row per teacher-only input (kind, image, origin, teacher-input height and width) and what was skipped."""
    d, s = params.data, params.data.scale
    q, max_side = d.min_side // s, d.teacher_only.max_side
    plan, skipped = [], []
    if scan is not None:
        for (name, path), (h, w) in zip(scan.images, scan.sizes, strict=True):
            plan.append({"kind": "unlabeled", "name": name, "origin": str(path), "height": h, "width": w})
    for kind in d.teacher_only.upcycle:
        for name, hw in zip(usable, hr_sizes, strict=True):
            h, w = zoom_in_size(hw, max_side) if kind == "zoom_in" else zoom_out_size(hw, s, max_side)
            if min(h, w) < q:
                skipped.append(
                    f"{kind} {name}: {w}x{h} is smaller than data.min_side / data.scale = {q} pixels per side"
                )
                continue
            plan.append({"kind": kind, "name": name, "origin": f"train/{name}", "height": h, "width": w})
    if (d.teacher_only.folder or d.teacher_only.upcycle) and not plan:
        raise UserError(
            f"no teacher-only input has {q} LR pixels per side "
            f"(data.min_side={d.min_side} / data.scale={s}, data.teacher_only.max_side={max_side}): "
            f"{'; '.join(skipped[:3])}"
        )
    return plan, skipped


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Whole training images (flat memory-mappable arrays), teacher-only inputs and validation images."""
    raw_dir, out_dir = paths.raw, paths.pairs
    d = params.data
    s, p, to = d.scale, d.min_side, d.teacher_only
    # The teacher-only folder first: missing, empty or unreadable stops here, before any work.
    scan = scan_unlabeled(to.folder, p // s, to.max_side) if to.folder else None
    manifest_path = raw_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} not found; run `dvc repro download`")
    # Names stay strings: DIV2K's "0801" must not become the number 801.
    raw = pd.read_csv(manifest_path, dtype={"name": str, "split": str}, keep_default_na=False)
    missing = {"split", "name", "width", "height"} - set(raw.columns)
    if missing:
        raise UserError(f"{manifest_path}: columns {sorted(missing)} missing; run `dvc repro download` again")
    train = raw[raw.split == "train"]
    valid = raw[raw.split == "valid"].name.tolist()

    usable, hr_sizes, skipped = [], [], []
    for name, w, h in zip(train.name, train.width, train.height, strict=True):
        if min(w, h) < p:
            print(
                f"[degrade] skipped {raw_dir / 'train' / name}.png: {w}x{h} is smaller than data.min_side={p}"
            )
            skipped.append(name)
        else:
            usable.append(name)
            hr_sizes.append((int(h) - int(h) % s, int(w) - int(w) % s))
    if not usable:
        raise UserError(
            f"no training image in {raw_dir / 'train'} is at least data.min_side={p} pixels on each side "
            f"({len(skipped)} skipped); nothing was written to {out_dir}"
        )
    plan, skipped_extra = _plan_teacher_only(params, usable, hr_sizes, scan)
    # The student's input of a teacher-only image is s x s times its teacher input; the teacher's output
    # (in data/teacher) as large again: both bounded by cache.max_gb, checked before anything is written.
    extra_bytes = sum(r["height"] * r["width"] * 3 * (1 + s * s) for r in plan)
    if extra_bytes > params.cache.max_gb * 1e9:
        raise UserError(
            f"the {len(plan)} teacher-only inputs would take {extra_bytes / 1e9:.2f} GB in {out_dir} (and about "
            f"as much again in the teacher cache), over cache.max_gb={params.cache.max_gb}; set "
            f"data.teacher_only.max_side (a centre crop of each), use fewer of them, or raise cache.max_gb"
        )

    with atomic_dir(out_dir) as tmp:
        lr_sizes = [(h // s, w // s) for h, w in hr_sizes]
        hr_arr, hr_off = _flat(tmp / "train_hr.npy", hr_sizes)
        in_arr, _ = _flat(tmp / "train_input.npy", hr_sizes)
        lr_arr, lr_off = _flat(tmp / "train_lr.npy", lr_sizes)
        rows = []
        for i, name in enumerate(progress(usable, desc="degrade: training images", unit="img")):
            img, _ = read_rgb(raw_dir / "train" / f"{name}.png")
            hr = crop_to_multiple(img, s)
            if hr.shape[:2] != hr_sizes[i]:
                raise UserError(
                    f"{raw_dir / 'train' / name}.png is {img.shape[1]}x{img.shape[0]}, not what {manifest_path} "
                    "says; run `dvc repro download` again"
                )
            lr, degraded, record = degrade_image(
                hr, s, params.degradation, np.random.default_rng(image_seed(params.seed, name))
            )
            hr_arr[hr_off[i] : hr_off[i + 1]] = hr.ravel()
            in_arr[hr_off[i] : hr_off[i + 1]] = degraded.ravel()
            lr_arr[lr_off[i] : lr_off[i + 1]] = lr.ravel()
            rows.append({"index": i, "name": name, "width": hr.shape[1], "height": hr.shape[0], **record})
        _manifest(rows).to_csv(tmp / "train_manifest.csv", index=False)

        if plan:
            t_arr, t_off = _flat(tmp / "teacher_only_lr.npy", [(r["height"], r["width"]) for r in plan])
            x_arr, x_off = _flat(tmp / "teacher_only_input.npy", [(r["height"], r["width"]) for r in plan], s)
            index = {name: i for i, name in enumerate(usable)}
            for j, r in enumerate(progress(plan, desc="degrade: teacher-only inputs", unit="img")):
                if r["kind"] == "unlabeled":
                    t_in = unlabeled_input(r["origin"], to.max_side)
                else:
                    i = index[r["name"]]
                    if r["kind"] == "zoom_in":
                        hr = hr_arr[hr_off[i] : hr_off[i + 1]].reshape(*hr_sizes[i], 3)
                        t_in = zoom_in_input(hr, to.max_side)
                    else:
                        lr = lr_arr[lr_off[i] : lr_off[i + 1]].reshape(*lr_sizes[i], 3)
                        t_in = zoom_out_input(lr, s, params.degradation.downscale, to.max_side)
                if t_in.shape[:2] != (r["height"], r["width"]):
                    raise UserError(f"{r['origin']} changed while degrade ran; run `dvc repro degrade` again")
                t_arr[t_off[j] : t_off[j + 1]] = t_in.ravel()
                x_arr[x_off[j] : x_off[j + 1]] = student_input(t_in, s, params.degradation.upscale).ravel()
            pd.DataFrame([{"index": j, **r} for j, r in enumerate(plan)]).to_csv(
                tmp / "teacher_only_manifest.csv", index=False
            )
            for a in (t_arr, x_arr):
                a.flush()
            del t_arr, x_arr
        for a in (hr_arr, in_arr, lr_arr):
            a.flush()
        del hr_arr, in_arr, lr_arr

        vrows, skipped_valid = [], []
        for j, name in enumerate(progress(valid, desc="degrade: validation images", unit="img")):
            img, _ = read_rgb(raw_dir / "valid" / f"{name}.png")
            hr = crop_to_multiple(center_crop(img, d.valid_max_side), s)
            if min(hr.shape[:2]) < s:
                print(
                    f"[degrade] skipped {raw_dir / 'valid' / name}.png: {img.shape[1]}x{img.shape[0]} is too small for scale {s}"
                )
                skipped_valid.append(name)
                continue
            lr, degraded, record = degrade_image(
                hr, s, params.degradation, np.random.default_rng([params.seed, 1, j])
            )
            for sub, arr in (("hr", hr), ("lr", lr), ("input", degraded)):
                save_image(tmp / "valid" / sub / f"{name}.png", arr)
            vrows.append(
                {"index": len(vrows), "name": name, "width": hr.shape[1], "height": hr.shape[0], **record}
            )
        if not vrows:
            raise UserError(f"no usable validation image in {raw_dir / 'valid'}")
        _manifest(vrows).to_csv(tmp / "valid_manifest.csv", index=False)
        kinds = {k: sum(r["kind"] == k for r in plan) for k in ("unlabeled", "zoom_in", "zoom_out")}
        summary = {
            "train_images": len(usable),
            "train_pixels": int(sum(h * w for h, w in hr_sizes)),
            "skipped_small": skipped,
            "skipped_small_valid": skipped_valid,
            "valid_images": len(vrows),
            "teacher_only_images": len(plan),
            "teacher_only": {k: v for k, v in kinds.items() if v},
            "teacher_only_skipped": (scan.skipped if scan else []) + skipped_extra,
            "teacher_only_bytes": extra_bytes,
            "unlabeled_folder": str(scan.folder) if scan else "",
            "scale": s,
            "min_side": p,
            "seed": params.seed,
            "degradation": flatten(params.degradation),
        }
        write_json(tmp / "pairs.json", summary)
    print(
        f"[degrade] {len(usable)} training images ({len(skipped)} skipped), {len(plan)} teacher-only inputs, "
        f"{len(vrows)} validation images"
    )
    tracker.log_metrics(
        {
            "degrade.train_images": len(usable),
            "degrade.teacher_only_images": len(plan),
            "degrade.valid_images": len(vrows),
            "degrade.skipped": len(skipped),
        }
    )
    return summary


if __name__ == "__main__":
    run_stage("degrade", run)
