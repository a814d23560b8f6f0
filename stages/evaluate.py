"""DVC stage `evaluate`: bicubic vs teacher vs student on the validation split and on extra test sets.

Three methods are scored against HR (sharpkd.evaluation): the degraded input itself ("bicubic"), the
teacher (its cached output for the validation split, tiled inference on the clean LR image for the
extra sets, as cache_teacher does) and the student (tiled inference on the degraded input). Speed is
one 1080p frame on the device the stage runs on (sharpkd.deploy.timing: `speed.<method>.<runtime>_<device>.1080p.ms`).

Writes (metrics/): eval.json (flat keys for `dvc exp show`), per_image.csv,
quality_speed.csv (DVC plot data) and compare/*.png (aligned crops; quality vs speed: sharpkd.report).
A bad entry in eval.sets (missing folder, unreadable or too small image) is
reported, recorded in eval.json and skipped; the rest is still evaluated.
"""

from __future__ import annotations

import torch

from sharpkd import evaluation
from sharpkd.config import Params
from sharpkd.errors import UserError
from sharpkd.fetch import resolve_weights_dir
from sharpkd.files import atomic_dir, atomic_path, write_json
from sharpkd.metrics import QualityMetrics
from sharpkd.models.student import load_student
from sharpkd.models.teacher_loader import load_teacher
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.report import write_figures
from sharpkd.tensors import default_device


def load_models(params: Params, paths: StagePaths, device):
    """(student, teacher, teacher.json) on `device`, after checking the upstream outputs are there."""
    if not (paths.teacher_cache / "cache.json").is_file():
        raise UserError(
            f"{paths.teacher_cache / 'cache.json'} not found: the teacher cache is missing or incomplete; run `dvc repro cache_teacher`"
        )
    student = load_student(paths.student / "student.pth", device)
    teacher, info = load_teacher(paths.teacher, device)
    if info["scale"] != params.data.scale:
        raise UserError(
            f"{paths.teacher}: the teacher is x{info['scale']} but data.scale is {params.data.scale}; run `dvc repro`"
        )
    return student, teacher, info


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Run the evaluation and write metrics/{eval.json, per_image.csv, quality_speed.csv, compare/}."""
    ev, scale, tile, overlap = params.eval, params.data.scale, params.infer.tile, params.infer.overlap
    if params.compute.threads:
        torch.set_num_threads(params.compute.threads)
    device = default_device()
    student, teacher, info = load_models(params, paths, device)
    metrics = QualityMetrics(scale, lpips=ev.lpips, weights_dir=resolve_weights_dir(params.weights.dir))
    methods = {
        "bicubic": lambda im: im.input,
        "teacher": evaluation.teacher_method(teacher, scale, tile, overlap, device=device),
        "student": evaluation.model_method(student, tile, overlap, align=scale, device=device),
    }
    sets = evaluation.eval_sets(params, paths.pairs, paths.teacher_cache, metrics.min_side)
    results = evaluation.score_sets(sets, methods, metrics, ev.compare_images, ev.crop)
    speed = evaluation.eval_speed(student, teacher, scale, device, params)

    facts = evaluation.model_facts(student, info)
    summary, rows = evaluation.summarize(results, speed, metrics.lpips_reason, facts)

    # Outputs: everything first into temporaries, eval.json last.
    quality_speed = evaluation.quality_speed_table(rows)
    with atomic_path(paths.metrics / "per_image.csv") as tmp:
        evaluation.per_image_table(results).to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.metrics / "quality_speed.csv") as tmp:
        quality_speed.to_csv(tmp, index=False)
    with atomic_dir(paths.metrics / "compare") as tmp:
        notes = [] if ev.teacher_speed_repeats else ["teacher not timed"]
        write_figures(tmp, results, quality_speed, scale, notes)
    write_json(paths.metrics / "eval.json", summary)

    print(evaluation.headline(summary))
    tracker.log_metrics(
        {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    )
    tracker.log_artifacts(str(paths.metrics / "compare"), "compare")
    return summary


if __name__ == "__main__":
    run_stage("evaluate", run)
