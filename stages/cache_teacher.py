"""DVC stage `cache_teacher`: run the teacher once over every training image and teacher-only input.

Writes data/teacher/ (sharpkd.teacher_cache says what and how): the teacher's output and LR-grid
features of each whole training image and teacher-only input, aligned with data/pairs, and its
output of each validation image. The size is estimated and bounded by cache.max_gb before anything
is written. With distill.teacher false (the no-teacher baseline) only the validation outputs are
made: the baseline never waits for a training cache it does not use. Everything is written into a
temporary folder that replaces data/teacher only when complete, and cache.json is its last file, so
a killed run leaves no partial cache.
"""

from __future__ import annotations

from pathlib import Path

from sharpkd.config import Params
from sharpkd.files import atomic_dir, write_json
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.teacher_cache import (
    cache_summary,
    cache_training,
    cache_validation,
    check_cache_size,
    fit_projection,
    load_cache_teacher,
    make_runner,
    save_projection,
    training_pools,
)


def run(params: Params, paths: StagePaths, tracker) -> dict:
    pairs_dir = Path(paths.pairs)
    teacher = load_cache_teacher(paths.teacher, params)
    pools = training_pools(params, pairs_dir, teacher.scale)
    runner = make_runner(teacher, params, with_features=bool(pools))
    sizes = check_cache_size(pools, runner, params.cache.max_gb)
    if runner.channels < runner.full_channels:  # fitted before writing: the projection is fixed
        runner.proj = fit_projection(runner, pools, params.cache, params.seed)

    with atomic_dir(paths.teacher_cache) as tmp:
        training = cache_training(tmp, pools, runner, sizes)
        if runner.proj is not None:
            save_projection(tmp / "feature_projection.npz", runner)
        runner.close()
        valid = cache_validation(tmp, pairs_dir, teacher, params)
        summary = cache_summary(teacher, runner, training, valid, sum(sizes.values()))
        write_json(tmp / "cache.json", summary)
    print(
        f"[cache_teacher] {summary['lr_pixels_per_s']:.0f} LR pixels/s on {teacher.device} "
        f"({training.seconds:.1f}s); {valid.images} validation images in {valid.seconds:.1f}s"
    )
    tracker.log_metrics(
        {"cache.lr_pixels_per_s": summary["lr_pixels_per_s"], "cache.bytes": summary["bytes"]}
    )
    tracker.set_tags({"device": str(teacher.device)})
    return summary


if __name__ == "__main__":
    run_stage("cache_teacher", run)
