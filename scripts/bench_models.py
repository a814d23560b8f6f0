"""`make bench`: the pipeline's student and teacher timed -> printed tables and metrics/bench.json.

- ms per frame and frames/s at 720p / 1080p / 4K (`sharpkd bench`: torch, ONNX Runtime; CUDA when present),
- the teacher's throughput on LR training patches (what cache_teacher does) and ms per 1080p output frame,
- the student's training steps/s at the distill batch shape of params.yaml,
- a 1080p clip sharpened end to end (decode, the INT8 student, H.264 encode; `sharpkd bench --video`)
  beside the model alone, measured in the same run (skipped when there is no exported student).

Usage: python scripts/bench_models.py [--repeats N] [--sizes 720p,1080p,4k] [--no-teacher] [--no-video]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from rich.console import Console

from sharpkd.config import load_params
from sharpkd.deploy.bench import DEFAULT_SIZES, TEACHER_DIR, render_table, run_bench
from sharpkd.deploy.bench_video import run_video_bench, video_lines
from sharpkd.deploy.models import DEFAULT_MODELS
from sharpkd.deploy.timing import time_ms
from sharpkd.errors import UserError
from sharpkd.files import write_json


def teacher_patch_throughput(lr_side: int, batch_size: int, batches: int = 3, device: str = "cpu") -> dict:
    """LR patches/s of the pipeline's teacher (models/teacher) in batches, as the cache_teacher stage runs it."""
    from sharpkd.models.teacher_loader import load_teacher

    teacher, info = load_teacher(TEACHER_DIR, device)
    x = torch.rand(batch_size, 3, lr_side, lr_side, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run():
        return teacher(x.to(device)).cpu()

    ms = time_ms(run, batches)
    return {
        "teacher": info.get("name") or info.get("architecture", "teacher"),
        "lr_patch": lr_side,
        "batch_size": batch_size,
        "device": device,
        "patches_per_s": round(batch_size * 1000.0 / ms, 2),
    }


def student_training_speed(
    scale: int, channels: int, blocks: int, patch: int, batch_size: int, steps: int = 5
) -> dict:
    """Training steps/s of a student of this shape: forward, L1 pixel + kd loss, backward, AdamW step,
    in the precision `compute.amp: true` trains in on this device (bf16 where native)."""
    from sharpkd.config import LossParams
    from sharpkd.losses import DistillObjective
    from sharpkd.models.student import Student
    from sharpkd.train import native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = native_bf16(torch.device(device))
    # What the default profile trains: pixel + KD, no perceptual or feature loss.
    loss = LossParams(
        pixel=1.0,
        kd=1.0,
        perceptual=0.0,
        perceptual_target="teacher",
        perceptual_layers=(),
        feature=0.0,
        feature_affinity=0.0,
    )
    objective = DistillObjective(Student(scale=scale, channels=channels, blocks=blocks), loss).to(device)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = {
        k: torch.rand(batch_size, 3, patch, patch, generator=gen).to(device)
        for k in ("input", "hr", "teacher")
    }

    def step():
        with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            total, _ = objective(batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    ms = time_ms(step, steps)
    return {
        "device": device,
        "precision": "bf16" if bf16 else "fp32",
        "patch": patch,
        "batch_size": batch_size,
        "steps_per_s": round(1000.0 / ms, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument(
        "--no-teacher", action="store_true", help="skip the teacher even when models/teacher exists"
    )
    ap.add_argument("--no-video", action="store_true", help="skip the end-to-end video row")
    ap.add_argument("--out", type=Path, default=Path("metrics/bench.json"))
    args = ap.parse_args()
    console = Console()
    teacher = not args.no_teacher and (TEACHER_DIR / "teacher.json").is_file()
    try:
        params = load_params()
        result = run_bench(None, teacher, args.sizes, args.repeats)  # tiling: params.yaml's infer
        s, d = params.data.scale, params.distill
        result["training"] = student_training_speed(
            s, params.student.channels, params.student.blocks, params.data.patch_size, d.batch_size
        )
        if teacher:
            device = result["rows"][-1]["device"]  # the teacher row: where run_bench timed it
            result["teacher_cache"] = teacher_patch_throughput(
                params.data.patch_size // s, params.cache.batch_size, device=device
            )
        if not args.no_video and any(p.is_file() for p in DEFAULT_MODELS):
            add_video(result, run_video_bench(repeats=args.repeats))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for note in result["notes"]:
        console.print(note, markup=False, soft_wrap=True)
    console.print(render_table(result))
    t = result["training"]
    console.print(
        f"student training: {t['steps_per_s']} steps/s on {t['device']} in {t['precision']} "
        f"(batch {t['batch_size']} of {t['patch']}x{t['patch']} patches)",
        markup=False,
    )
    if "teacher_cache" in result:
        c = result["teacher_cache"]
        console.print(
            f"teacher {c['teacher']}: {c['patches_per_s']} LR patches/s on {c['device']} "
            f"(batches of {c['batch_size']} patches of {c['lr_patch']}x{c['lr_patch']})",
            markup=False,
        )
    if "video" in result:
        console.print(render_table({**result, "rows": result["video_rows"]}))
        for line in video_lines(result):
            console.print(line, markup=False, soft_wrap=True)
    write_json(args.out, result)
    console.print(f"wrote {args.out}", markup=False)
    return 0


def add_video(result: dict, video: dict) -> None:
    """The video benchmark into the result: its rows, its ratios, and the end-to-end figures among the others
    (the model-alone figures it was set against are in `video_rows`, measured beside it)."""
    result["video_rows"] = video["rows"]
    result["video"] = video["video"]
    result["figures"].update({k: v for k, v in video["figures"].items() if ".video_" in k})
    result["notes"] += video["notes"]


if __name__ == "__main__":
    sys.exit(main())
