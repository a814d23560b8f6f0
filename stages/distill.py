"""DVC stage `distill`: train the student against HR, the cached teacher outputs and features.

data/pairs + data/teacher -> models/student/ (student.pth: the best by validation PSNR, last.pth,
student.json), metrics/train.json, metrics/train_curve.tsv (a row per validation: DVC's plots) and
metrics/train_steps.tsv (every step's loss terms); the training is sharpkd/distillation.py.
Runs unchanged under `torchrun --nproc_per_node=N stages/distill.py` (DDP; rank 0 writes).
"""

from __future__ import annotations

from sharpkd.config import Params
from sharpkd.distillation import distill_student
from sharpkd.files import atomic_dir, write_json
from sharpkd.models.student import save_student
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.train import write_curves


def run(params: Params, paths: StagePaths, tracker) -> dict:
    checkpoint = paths.checkpoints / "ckpt.pt"
    distilled = distill_student(params, paths.pairs, paths.teacher_cache, checkpoint, tracker)
    if distilled is None:  # a torchrun rank other than 0: it trained, rank 0 writes
        return {}
    result, summary = distilled.result, distilled.summary
    with atomic_dir(paths.student) as tmp:
        save_student(
            distilled.best, tmp / "student.pth", {"val": result.best_metrics, "step": result.best_step}
        )
        save_student(distilled.last, tmp / "last.pth", {"val": result.last_metrics, "step": result.steps})
        write_json(tmp / "student.json", distilled.info)
    write_json(paths.metrics / "train.json", summary)
    write_curves(result.curve, paths.metrics / "train_curve.tsv", paths.metrics / "train_steps.tsv")
    speed = summary.get("steps_per_s_reason") or f"{result.steps_per_s:.2f} steps/s ({result.precision})"
    print(
        f"[distill] best val PSNR {summary['val_psnr']:.2f} dB (step {result.best_step}), {speed}, "
        f"{summary['params']:,} params, {summary['gmacs_1080p']} GMACs/1080p"
    )
    tracker.log_metrics({f"distill.{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


if __name__ == "__main__":
    run_stage("distill", run)
