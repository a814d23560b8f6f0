"""Distilling the student: training it against HR, the cached teacher outputs and features.

`distill_student` is the `distill` stage's work between its inputs (data/pairs, the teacher cache
in data/teacher) and its outputs, which the stage writes. Batches are random crops of the whole
training images (data/datasets.py); with distill.teacher_only_fraction > 0 that share of each batch
comes from the teacher-only inputs, whose only target is the teacher. With distill.teacher false
(the no-teacher baseline) nothing of the teacher cache but cache.json is read. Under torchrun every
rank trains (DDP, train.fit) and rank 0 alone validates and returns the result.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sharpkd.config import Params, flatten
from sharpkd.crop_training import fit_on_crops, loop_config
from sharpkd.data.datasets import TEACHER_FILES, TrainPatches, load_valid, read_pairs_info, teacher_only_count
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest, resolve_weights_dir
from sharpkd.finetune import init_from, init_source
from sharpkd.losses import DistillObjective
from sharpkd.models import count_params
from sharpkd.models.student import Student, conv_macs
from sharpkd.train import FitConfig, FitResult, distributed_setup, speed_fields


@dataclass
class DistilledStudent:
    """What a distillation run produced, as deployed: a rep student folded into the plain network
    (what is saved, exported and run)."""

    best: Student  # at the best validation PSNR (models/student/student.pth)
    last: Student  # after the last step (last.pth)
    result: FitResult
    summary: dict  # metrics/train.json
    info: dict  # models/student/student.json: the summary, the architecture and the loss terms used


def distill_student(
    params: Params, pairs_dir: Path, teacher_cache_dir: Path, checkpoint_path: Path, tracker
) -> DistilledStudent | None:
    """Train the student of params.student on data/pairs and the teacher cache, resuming from
    `checkpoint_path` when it was written by the same training (`fit_config`); None on a torchrun
    rank other than 0."""
    rank, world = distributed_setup()
    if params.compute.threads:
        torch.set_num_threads(params.compute.threads)
    cache_info = read_cache_info(teacher_cache_dir, needs_training_outputs=params.distill.teacher)
    # The seed, then the student, then the objective: the order the initial weights depend on.
    torch.manual_seed(params.seed)
    student = build_student(params)
    init_from(student, params)
    # Built before any step: a missing VGG file or feature cache stops here.
    objective = DistillObjective(
        student, params.loss, cache_info.get("feature_channels", 0), resolve_weights_dir(params.weights.dir)
    )
    d = params.distill
    if d.teacher:
        kinds = ("train", "teacher_only") if d.teacher_only_fraction > 0 else ("train",)
        verify_cache(teacher_cache_dir, cache_info, objective.needed_keys(), kinds)
    patches = TrainPatches(
        pairs_dir,
        teacher_cache_dir if d.teacher else None,
        keys=objective.needed_keys(),
        patch_size=params.data.patch_size,
        teacher_only_fraction=d.teacher_only_fraction,
    )
    result = fit_on_crops(
        objective,
        patches.batch_fn(d.batch_size, params.seed, rank, world),
        fit_config(params, world, cache_info, pairs_dir),
        model=student,
        valid=load_valid(pairs_dir) if rank == 0 else [],
        params=params,
        use="input",
        scale_out=1,
        align=params.data.scale,
        tracker=tracker,
        log_prefix="train.",
        desc="distill",
        checkpoint_path=checkpoint_path,
    )
    if rank != 0:
        return None
    return _deployed(params, student, objective, result, world)


def build_student(params: Params) -> Student:
    sp = params.student
    return Student(
        scale=params.data.scale,
        channels=sp.channels,
        blocks=sp.blocks,
        activation=sp.activation,
        block=sp.block,
        rep_expand=sp.rep_expand,
    )


def fit_config(params: Params, world: int, cache_info: dict, pairs_dir: Path) -> FitConfig:
    """The training loop's settings, with the fingerprint a checkpoint must match to be resumed."""
    d = params.distill
    return loop_config(
        d,
        params,
        weight_decay=d.weight_decay,
        checkpoint_every=d.checkpoint_every,
        ema_decay=d.ema,
        keep=d.keep,
        # The cache's content, not its timings: a rebuilt but identical cache still resumes.
        fingerprint={
            "params": training_params(params),
            "world": world,
            "cache": cache_identity(cache_info),
            "pairs": read_pairs_info(pairs_dir),
            "init_sha256": (init_source(params) or (None, None))[1],
        },
    )


def training_params(params: Params) -> dict:
    """What a checkpoint must have been trained with to be resumed (the cache's identity is checked apart)."""
    groups = {"loss.": params.loss, "student.": params.student, "distill.": params.distill}
    flat = {k: v for prefix, group in groups.items() for k, v in flatten(group, prefix).items()}
    shared = {"data.patch_size": params.data.patch_size, "compute.threads": params.compute.threads}
    return {"seed": params.seed, "data.scale": params.data.scale, **shared, **flat}


def cache_identity(cache_info: dict) -> dict:
    """cache.json without the fields that time its making (they differ between identical caches).

    The arrays' sha256 (`pools.<kind>.sha256`) stay in: a checkpoint resumes only against the very
    outputs it was trained on (a rebuilt cache of the same bytes still resumes; one whose teacher or
    arithmetic changed them trains again instead of mixing two targets)."""
    timings = ("device", "lr_pixels_per_s", "train_seconds", "valid_seconds", "hash_seconds")
    return {k: v for k, v in cache_info.items() if k not in timings}


def verify_cache(teacher_cache_dir: Path, cache_info: dict, keys, kinds) -> None:
    """The teacher's arrays this run reads (`keys` of `kinds`) against the sha256 cache_teacher recorded in
    cache.json, before any step: DVC compares a file's size and mtime first, so a same-size change that
    kept its mtime leaves `dvc status` clean. Costs one read of those arrays (about 1 GB/s of sha256
    here, plus the disk: ~15 s for the full profile's 15 GB)."""
    folder = Path(teacher_cache_dir)
    names = [TEACHER_FILES[kind][key] for kind in kinds for key in ("teacher", "feat") if key in keys]
    sums = {
        n: d for kind in kinds for n, d in cache_info.get("pools", {}).get(kind, {}).get("sha256", {}).items()
    }
    if not names:
        return
    unrecorded = [n for n in names if n not in sums]
    if unrecorded:
        print(
            f"[distill] {folder / 'cache.json'} records no checksum of {', '.join(unrecorded)} (made by an "
            "older sharpkd): not verified; `dvc repro -f cache_teacher` records them"
        )
    t0, total = time.perf_counter(), 0
    for name in (n for n in names if n in sums):
        path = folder / name
        if not path.is_file():
            raise UserError(
                f"{path} not found: the teacher cache is incomplete; run `dvc repro -f cache_teacher`"
            )
        total += path.stat().st_size
        if file_digest(path) != sums[name]:
            raise UserError(
                f"{path} does not match the sha256 cache_teacher recorded in cache.json (changed since it was "
                "written); run `dvc repro -f cache_teacher`"
            )
    seconds = time.perf_counter() - t0
    print(f"[distill] teacher cache verified: {total / 1e9:.3f} GB in {seconds:.1f} s")


def read_cache_info(teacher_cache_dir: Path, needs_training_outputs: bool) -> dict:
    """cache.json, written last by cache_teacher: without it the cache is missing or incomplete.
    `needs_training_outputs` (distill.teacher): the cache must hold the teacher's training outputs."""
    path = Path(teacher_cache_dir) / "cache.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: the teacher cache is missing or incomplete; run `dvc repro cache_teacher`"
        )
    cache_info = json.loads(path.read_text())
    if needs_training_outputs and not cache_info.get("train"):
        raise UserError(
            f"{path}: the teacher cache holds no training outputs (it was made with "
            "distill.teacher false); run `dvc repro cache_teacher`"
        )
    return cache_info


def _deployed(
    params: Params, student: Student, objective: DistillObjective, result: FitResult, world: int
) -> DistilledStudent:
    """The best and the last student, folded, and what metrics/train.json and student.json say of them."""
    student_cpu = student.cpu().eval()
    best = Student(**student_cpu.arch_kwargs())
    prefix = "student."  # the student's keys in the objective's state dict
    best.load_state_dict({k[len(prefix) :]: v for k, v in result.best_state.items() if k.startswith(prefix)})
    best, last = best.deploy(), student_cpu.deploy()
    d = params.distill
    summary = {
        "steps": result.steps,
        "best_step": result.best_step,
        "val_psnr": result.best_metrics.get("psnr"),
        "val_ssim": result.best_metrics.get("ssim"),
        # With distill.ema: the raw weights' PSNR at the same validation (null without an average).
        "val_raw_psnr": result.best_metrics.get("raw_psnr"),
        "last_val_psnr": result.last_metrics.get("psnr"),
        "seconds": round(result.seconds, 2),
        **speed_fields(result, 3),
        "resumed_from": result.resumed_from,
        "params": count_params(best),
        "gmacs_1080p": round(conv_macs(best) / 1e9, 3),
        "world_size": world,
        "teacher_only_per_batch": teacher_only_count(d.batch_size, d.teacher_only_fraction),
    }
    info = {
        "arch": best.arch_kwargs(),
        "trained_block": params.student.block,
        "init": params.student.init or None,
        "init_sha256": (init_source(params) or (None, None))[1],
        "loss_terms": [k for k, v in objective.w.items() if v > 0],
        **summary,
    }
    return DistilledStudent(best, last, result, summary, info)
