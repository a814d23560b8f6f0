"""`make bench`: `sharpkd bench` on the pipeline's student (and teacher when present) -> metrics/bench.json.

Usage: python scripts/bench_models.py [--repeats N] [--sizes 720p,1080p,4k] [--no-teacher]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from sharpkd.bench import DEFAULT_SIZES, TEACHER_DIR, render_table, run_bench
from sharpkd.errors import UserError
from sharpkd.files import write_json
from sharpkd.sharpen import default_tiling


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument(
        "--no-teacher", action="store_true", help="skip the teacher even when models/teacher exists"
    )
    ap.add_argument("--out", type=Path, default=Path("metrics/bench.json"))
    args = ap.parse_args()
    teacher = not args.no_teacher and (TEACHER_DIR / "teacher.json").is_file()
    tile, overlap = default_tiling()
    try:
        result = run_bench(None, teacher, args.sizes, args.repeats, tile=tile, overlap=overlap)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    console = Console()
    for note in result["notes"]:
        console.print(note, markup=False, soft_wrap=True)
    console.print(render_table(result))
    write_json(args.out, result)
    console.print(f"wrote {args.out}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
