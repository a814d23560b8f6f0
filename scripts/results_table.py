"""The README's results table, from the metrics/eval.json of DVC experiments (never typed by hand).

Usage: python scripts/results_table.py DISTILLED BASELINE [--readme README.md]

DISTILLED and BASELINE are DVC experiment names (e.g. ref-distill, ref-baseline from `make reference`).
Rows: bicubic, the teacher, the student with and without distillation; columns: PSNR / SSIM / LPIPS
(null -> n/a) per evaluated set, parameters, ms per 1080p frame. With --readme, the table replaces
what stands between the `<!-- results:start -->` and `<!-- results:end -->` markers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def experiment_metrics(names: list[str]) -> dict[str, dict]:
    """name -> {eval.json key: value} for each named experiment, whatever commit it was based on."""
    import dvc.api

    rows = dvc.api.exp_show(num=-1)
    found: dict[str, dict] = {}
    for row in rows:
        name = row.get("Experiment")
        if name in names and name not in found:
            # exp_show prefixes a column with its file only when two files share the key.
            found[name] = {k.split(":", 1)[-1]: v for k, v in row.items()}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"error: no DVC experiment named {', '.join(missing)} (see `dvc exp show`)")
    return found


def _fmt(value, digits: int) -> str:
    if value is None or value == "" or value == "-":
        return "n/a"
    return f"{float(value):.{digits}f}"


def sets_of(metrics: dict) -> list[str]:
    """Evaluated sets, extra sets first (Set5, ...), then the validation split."""
    sets = {k.split(".")[0] for k in metrics if re.fullmatch(r"[^.]+\.student\.psnr", k)}
    return sorted(sets - {"valid"}) + (["valid"] if "valid" in sets else [])


def build_table(distilled: dict, baseline: dict, names: tuple[str, str]) -> str:
    sets = sets_of(distilled)
    teacher = distilled.get("teacher.architecture") or "teacher"
    rows = [
        ("bicubic (the degraded input)", distilled, "bicubic"),
        (f"teacher ({teacher})", distilled, "teacher"),
        (f"student, distilled (`{names[0]}`)", distilled, "student"),
        (f"student, no distillation (`{names[1]}`)", baseline, "student"),
    ]
    header = ["method"] + [f"{s} PSNR / SSIM / LPIPS" for s in sets] + ["params", "ms / 1080p frame"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m, method in rows:
        cells = [
            f"{_fmt(m.get(f'{s}.{method}.psnr'), 2)} / {_fmt(m.get(f'{s}.{method}.ssim'), 4)} / "
            f"{_fmt(m.get(f'{s}.{method}.lpips'), 3)}"
            for s in sets
        ]
        params = m.get(f"{method}.params")
        ms = m.get(f"{method}.ms_1080p")
        cells += [f"{int(params):,}" if params not in (None, "", "-") else "", _fmt(ms, 0)]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    gains = ", ".join(
        f"{float(distilled[f'{s}.student.psnr']) - float(baseline[f'{s}.student.psnr']):+.2f} dB on {s}"
        for s in sets
    )
    minutes = [m.get("seconds") for m in (distilled, baseline)]
    lines.append("")
    lines.append(f"Distillation against no distillation (student PSNR): {gains}.")
    if all(isinstance(t, int | float) for t in minutes) and isinstance(distilled.get("steps"), int | float):
        lines.append(
            f"Training time: {minutes[0] / 60:.0f} min (distilled) and {minutes[1] / 60:.0f} min (baseline), "
            f"{int(distilled['steps']):,} steps each."
        )
    device = distilled.get("timing.device") or "?"
    threads = distilled.get("timing.torch_threads")
    threads = int(threads) if isinstance(threads, int | float) else "?"
    lines.append("")
    lines.append(
        f"PSNR/SSIM: Y channel, border of `data.scale` cropped (pyiqa); ms on {device}, {threads} torch threads."
    )
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"error: README has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("distilled")
    ap.add_argument("baseline")
    ap.add_argument("--readme", type=Path, help="write the table into this file between the markers")
    args = ap.parse_args()
    metrics = experiment_metrics([args.distilled, args.baseline])
    table = build_table(metrics[args.distilled], metrics[args.baseline], (args.distilled, args.baseline))
    print(table)
    if args.readme:
        from sharpkd.files import write_text

        write_text(args.readme, replace_block(args.readme.read_text(), table))
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
