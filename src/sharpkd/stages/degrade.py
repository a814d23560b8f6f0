"""DVC stage `degrade`: training patches and validation images with their degraded versions -> data/pairs/."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from sharpkd.config import Params, flatten
from sharpkd.data.degradation import center_crop, crop_to_multiple, degrade_image
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.images import read_rgb, save_image
from sharpkd.stages import StagePaths, run_stage


def _manifest(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("jpeg_quality", "noise_seed"):  # integers or empty, never 85.0
        df[col] = df[col].astype("Int64")
    return df


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Training patches (memory-mappable arrays) and whole validation images, degraded."""
    raw_dir, out_dir = paths.raw, paths.pairs
    s, p, per = params.data.scale, params.data.patch_size, params.data.patches_per_image
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
    rng = np.random.default_rng(params.seed)

    usable, skipped = [], []
    for name, w, h in zip(train.name, train.width, train.height, strict=True):
        if min(w, h) < p:
            print(
                f"[degrade] skipped {raw_dir / 'train' / name}.png: {w}x{h} is smaller than data.patch_size={p}"
            )
            skipped.append(name)
        else:
            usable.append(name)
    if not usable:
        raise UserError(
            f"no training image in {raw_dir / 'train'} is at least data.patch_size={p} pixels on each side "
            f"({len(skipped)} skipped); nothing was written to {out_dir}"
        )

    n = len(usable) * per
    with atomic_dir(out_dir) as tmp:
        arrays = {
            key: np.lib.format.open_memmap(
                tmp / f"train_{key}.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3)
            )
            for key, side in (("hr", p), ("lr", p // s), ("input", p))
        }
        rows = []
        i = 0
        for name in tqdm(usable, desc="degrade: training patches", unit="img"):
            img, _ = read_rgb(raw_dir / "train" / f"{name}.png")
            h, w = img.shape[:2]
            if min(h, w) < p:
                raise UserError(
                    f"{raw_dir / 'train' / name}.png is {w}x{h}, not what {manifest_path} says; run `dvc repro download` again"
                )
            for _ in range(per):
                y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
                hr = img[y : y + p, x : x + p]
                lr, degraded, record = degrade_image(hr, s, params.degradation, rng)
                arrays["hr"][i], arrays["lr"][i], arrays["input"][i] = hr, lr, degraded
                rows.append({"index": i, "image": name, "x": x, "y": y, "size": p, **record})
                i += 1
        for a in arrays.values():
            a.flush()
        del arrays
        _manifest(rows).to_csv(tmp / "train_manifest.csv", index=False)

        vrows, skipped_valid = [], []
        for j, name in enumerate(tqdm(valid, desc="degrade: validation images", unit="img")):
            img, _ = read_rgb(raw_dir / "valid" / f"{name}.png")
            hr = crop_to_multiple(center_crop(img, params.data.valid_max_side), s)
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
        summary = {
            "train_patches": n,
            "train_images": len(usable),
            "skipped_small": skipped,
            "skipped_small_valid": skipped_valid,
            "valid_images": len(vrows),
            "scale": s,
            "patch_size": p,
            "seed": params.seed,
            "degradation": flatten(params.degradation),
        }
        write_json(tmp / "pairs.json", summary)
    print(
        f"[degrade] {n} training patches from {len(usable)} images ({len(skipped)} skipped), {len(vrows)} validation images"
    )
    tracker.log_metrics(
        {"degrade.train_patches": n, "degrade.valid_images": len(vrows), "degrade.skipped": len(skipped)}
    )
    return summary


if __name__ == "__main__":
    run_stage("degrade", run)
