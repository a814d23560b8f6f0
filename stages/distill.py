"""DVC stage `distill`: train the student against HR, the cached teacher outputs and features.

Batches are random crops of the whole training images (data/datasets.py); with
distill.teacher_only_fraction > 0 that share of each batch comes from the teacher-only inputs,
whose only target is the teacher. With distill.teacher false (the no-teacher baseline) nothing
of the teacher cache but cache.json is read.

-> models/student/, metrics/train.json, metrics/train_curve.tsv. Runs unchanged under
`torchrun --nproc_per_node=N stages/distill.py` (DDP; rank 0 writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from sharpkd.config import Params, flatten
from sharpkd.data.datasets import TrainPatches, load_valid, read_pairs_info, teacher_only_count
from sharpkd.errors import UserError
from sharpkd.fetch import resolve_weights_dir
from sharpkd.files import atomic_dir, atomic_path, write_json
from sharpkd.losses import DistillObjective
from sharpkd.metrics import QualityMetrics, validate
from sharpkd.models import count_params
from sharpkd.models.student import Student, conv_macs, save_student
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.train import FitConfig, distributed_setup, fit, speed_fields


def run(params: Params, paths: StagePaths, tracker) -> dict:
    pairs_dir, teacher_dir, out_dir = paths.pairs, paths.teacher_cache, paths.student
    rank, world = distributed_setup()
    if params.compute.threads:
        torch.set_num_threads(params.compute.threads)
    cache_info = _cache_info(teacher_dir)
    if params.distill.teacher and not cache_info.get("train"):
        raise UserError(
            f"{teacher_dir / 'cache.json'}: the teacher cache holds no training outputs (it was made with "
            "distill.teacher false); run `dvc repro cache_teacher`"
        )
    torch.manual_seed(params.seed)
    sp = params.student
    student = Student(
        scale=params.data.scale,
        channels=sp.channels,
        blocks=sp.blocks,
        activation=sp.activation,
        block=sp.block,
        rep_expand=sp.rep_expand,
    )
    # Built before any step: a missing VGG file or feature cache stops here.
    objective = DistillObjective(
        student, params.loss, cache_info.get("feature_channels", 0), resolve_weights_dir(params.weights.dir)
    )
    d = params.distill
    patches = TrainPatches(
        pairs_dir,
        teacher_dir if d.teacher else None,
        keys=objective.needed_keys(),
        patch_size=params.data.patch_size,
        teacher_only_fraction=d.teacher_only_fraction,
    )
    valid = load_valid(pairs_dir) if rank == 0 else []
    metrics = QualityMetrics(params.data.scale, lpips=False)
    cfg = FitConfig(
        steps=d.steps,
        lr=d.lr,
        weight_decay=d.weight_decay,
        warmup_steps=d.warmup_steps,
        grad_clip=d.grad_clip,
        eval_every=d.eval_every,
        checkpoint_every=d.checkpoint_every,
        amp=params.compute.amp,
        seed=params.seed,
        # The cache's content, not its timings: a rebuilt but identical cache still resumes.
        fingerprint={
            "params": _training_params(params),
            "world": world,
            "cache": _cache_identity(cache_info),
            "pairs": read_pairs_info(pairs_dir),
        },
    )
    result = fit(
        objective,
        patches.batch_fn(d.batch_size, params.seed, rank, world),
        cfg,
        evaluate=lambda: validate(
            student,
            valid,
            metrics,
            use="input",
            scale_out=1,
            tile=params.infer.tile,
            overlap=params.infer.overlap,
            align=params.data.scale,
        ),
        checkpoint_path=paths.checkpoints / "ckpt.pt",
        log_metrics=lambda m, step: tracker.log_metrics({f"train.{k}": v for k, v in m.items()}, step=step),
        desc="distill",
    )
    if rank != 0:
        return {}

    student_cpu = student.cpu().eval()
    best = Student(**student_cpu.arch_kwargs())
    prefix = "student."
    best.load_state_dict({k[len(prefix) :]: v for k, v in result.best_state.items() if k.startswith(prefix)})
    # What is saved, exported and run is the plain network (a rep student folded into it).
    best, last = best.deploy(), student_cpu.deploy()
    summary = {
        "steps": result.steps,
        "best_step": result.best_step,
        "val_psnr": result.best_metrics.get("psnr"),
        "val_ssim": result.best_metrics.get("ssim"),
        "last_val_psnr": result.last_metrics.get("psnr"),
        "seconds": round(result.seconds, 2),
        **speed_fields(result, 3),
        "resumed_from": result.resumed_from,
        "params": count_params(best),
        "gmacs_1080p": round(conv_macs(best) / 1e9, 3),
        "world_size": world,
        "teacher_only_per_batch": teacher_only_count(d.batch_size, d.teacher_only_fraction),
    }
    loss_terms = [k for k, v in objective.w.items() if v > 0]
    with atomic_dir(out_dir) as tmp:
        save_student(best, tmp / "student.pth", {"val": result.best_metrics, "step": result.best_step})
        save_student(last, tmp / "last.pth", {"val": result.last_metrics, "step": result.steps})
        student_json = {
            "arch": best.arch_kwargs(),
            "trained_block": sp.block,
            "loss_terms": loss_terms,
            **summary,
        }
        write_json(tmp / "student.json", student_json)
    write_json(paths.metrics / "train.json", summary)
    with atomic_path(paths.metrics / "train_curve.tsv") as tmp:
        pd.DataFrame(result.curve).to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    print(
        f"[distill] best val PSNR {summary['val_psnr']:.2f} dB (step {result.best_step}), "
        f"{summary.get('steps_per_s_reason') or f'{result.steps_per_s:.2f} steps/s ({result.precision})'}, "
        f"{summary['params']:,} params, {summary['gmacs_1080p']} GMACs/1080p"
    )
    tracker.log_metrics({f"distill.{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def _training_params(params: Params) -> dict:
    """What a checkpoint must have been trained with to be resumed (the cache's identity is checked apart)."""
    groups = {"loss.": params.loss, "student.": params.student, "distill.": params.distill}
    flat = {k: v for prefix, group in groups.items() for k, v in flatten(group, prefix).items()}
    shared = {"data.patch_size": params.data.patch_size, "compute.threads": params.compute.threads}
    return {"seed": params.seed, "data.scale": params.data.scale, **shared, **flat}


def _cache_identity(cache_info: dict) -> dict:
    timings = ("device", "lr_pixels_per_s", "train_seconds", "valid_seconds")
    return {k: v for k, v in cache_info.items() if k not in timings}


def _cache_info(teacher_dir) -> dict:
    path = Path(teacher_dir) / "cache.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: the teacher cache is missing or incomplete; run `dvc repro cache_teacher`"
        )
    return json.loads(path.read_text())


if __name__ == "__main__":
    run_stage("distill", run)
