"""DVC stage `download`: HR images from data.source -> data/raw/{train,valid}/*.png + manifest.csv."""

from __future__ import annotations

import pandas as pd

from sharpkd.config import Params
from sharpkd.data.sources import source_images
from sharpkd.deploy.images import ImageReadError, save_image
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.files import atomic_dir
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.progress import progress


def run(params: Params, paths: StagePaths, tracker) -> dict:
    source, out_dir = params.data.source, paths.raw
    splits = source_images(params)

    rows, skipped = [], []
    with atomic_dir(out_dir) as tmp:
        for split, items in splits.items():
            used = set()
            for name, origin, loader in progress(list(items), desc=f"download: {split}", unit="img"):
                try:
                    rgb, note = loader()
                except ImageReadError as exc:
                    print(f"[download] skipped {exc}")
                    skipped.append(str(exc))
                    continue
                if note:
                    print(f"[download] {origin}: converted ({note})")
                name = _unique(name, used)
                path = tmp / split / f"{name}.png"
                save_image(path, rgb)
                rows.append({
                    "split": split, "source": source, "name": name, "origin": origin,
                    "width": rgb.shape[1], "height": rgb.shape[0],
                    "sha256": file_digest(path), "note": note,
                })  # fmt: skip
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "valid")}
        for split, count in counts.items():
            if count == 0:
                raise UserError(
                    f"data.source={source}: no usable {split} image (skipped {len(skipped)} unreadable files); "
                    f"nothing was written to {out_dir}"
                )
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    print(
        f"[download] {counts['train']} train, {counts['valid']} valid images from {source}; {len(skipped)} unreadable skipped"
    )
    tracker.log_metrics(
        {
            "download.train_images": counts["train"],
            "download.valid_images": counts["valid"],
            "download.skipped": len(skipped),
        }
    )
    return {**counts, "skipped": skipped}


def _unique(name: str, used: set[str]) -> str:
    base, k = name, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


if __name__ == "__main__":
    run_stage("download", run)
