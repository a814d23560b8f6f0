"""DVC stage `degrade`: whole training and validation images with their degraded versions -> data/pairs/.

The work is in sharpkd.data.pairs (what is written and why) over the flat image store (data/store.py);
this script plans, writes data/pairs atomically and logs the counts. The data.teacher_only.folder is
checked first, before any work; the training images, the teacher-only inputs and their size are
planned before anything is written.
"""

from __future__ import annotations

from sharpkd.config import Params
from sharpkd.data.pairs import (
    check_teacher_only_size,
    pairs_summary,
    plan_teacher_only,
    plan_training,
    read_raw_manifest,
    write_teacher_only,
    write_training,
    write_validation,
)
from sharpkd.data.teacher_only import scan_teacher_only
from sharpkd.files import atomic_dir, write_json
from sharpkd.pipeline import StagePaths, run_stage


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Whole training images (flat memory-mappable arrays), teacher-only inputs and validation images."""
    d = params.data
    # The teacher-only folder first: missing, empty, unreadable or holding a link into the held-out or
    # output folders stops here, before any work.
    scan = scan_teacher_only(params)
    raw = read_raw_manifest(paths.raw)
    training = plan_training(raw, d.scale, d.min_side, paths.pairs)
    extra = plan_teacher_only(params, training, scan)
    check_teacher_only_size(extra, params.cache.max_gb, paths.pairs)

    with atomic_dir(paths.pairs) as tmp:
        write_training(tmp, raw, training, params)
        write_teacher_only(tmp, extra, training, params)  # zoom-ins read the training arrays just written
        valid = write_validation(tmp, raw, params)
        summary = pairs_summary(params, training, extra, valid)
        write_json(tmp / "pairs.json", summary)
    print(
        f"[degrade] {len(training.names)} training images ({len(training.skipped)} skipped), "
        f"{len(extra.rows)} teacher-only inputs, {valid.count} validation images"
    )
    tracker.log_metrics(
        {
            "degrade.train_images": len(training.names),
            "degrade.teacher_only_images": len(extra.rows),
            "degrade.valid_images": valid.count,
            "degrade.skipped": len(training.skipped),
        }
    )
    return summary


if __name__ == "__main__":
    run_stage("degrade", run)
