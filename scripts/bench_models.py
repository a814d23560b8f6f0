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
import sys
from pathlib import Path

from rich.console import Console

from sharpkd.bench import (
    DEFAULT_SIZES,
    STUDENT_INT8,
    STUDENT_ONNX,
    TEACHER_DIR,
    render_table,
    run_bench,
    run_video_bench,
    student_training_speed,
    teacher_patch_throughput,
    video_lines,
)
from sharpkd.config import load_params
from sharpkd.errors import UserError
from sharpkd.files import write_json


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
        if not args.no_video and (STUDENT_INT8.is_file() or STUDENT_ONNX.is_file()):
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
