"""The evaluate stage's pictures: aligned crops of each method beside HR, and PSNR against ms per 1080p
frame with the published x4 lines of the sets measured (their sources below) -> metrics/compare/*.png."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from sharpkd.deploy.images import printable

CAPTIONS = {"bicubic": "input (bicubic)", "teacher": "teacher", "student": "student"}
# Published Set5 / Set14 x4 numbers (PSNR dB, SSIM), for the quality-vs-speed plot.
PUBLISHED_X4 = {
    "Set5": {
        "bicubic": (28.42, 0.8104),
        "FSRCNN": (30.71, 0.8657),
        "VDSR": (31.35, 0.8838),
        "SwinIR-M": (32.72, 0.9021),
    },
    "Set14": {"bicubic": (26.00, 0.7027), "SwinIR-M": (28.94, 0.7914)},
}

# Published plain-conv and efficient SR models near our students' size, Set5 x4 (Y, border 4), as issue 26
# measured them from their public checkpoints with this project's convention: (params, Set5 PSNR, Set5 PSNR
# after a plain static INT8 quantisation or None where not measured, ms per 1080p frame on this repo's CPU
# or None where not measured, source). None of their checkpoints is on these machines: nothing is re-measured.
PUBLISHED_STUDENTS = {
    "FSRCNN (OpenCV dnn_superres, float32)": (12_464, 30.71, None, 115, "Dong et al., ECCV 2016"),
    "PlainUSR-T": (60_100, 31.20, 30.65, None, "Wang et al., PlainUSR, ACCV 2024"),
    "PlainUSR-S": (68_612, 31.56, None, None, "Wang et al., PlainUSR, ACCV 2024"),
    "DSCLoRA": (130_828, 31.75, None, None, "NTIRE 2025 efficient SR challenge, 1st"),
    "PlainUSR-M": (165_492, 31.79, None, None, "Wang et al., PlainUSR, ACCV 2024"),
}


# Text drawn as given: a file name such as `$5_and_$10.png` is not mathtext (which would fail on it after all
# the scoring), nor LaTeX where a user's matplotlibrc sets text.usetex.
PLAIN = {"parse_math": False, "usetex": False}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def save_compare(path: Path, set_name: str, item: dict, scale: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, side = item["at"]
    panels = [("bicubic", CAPTIONS["bicubic"]), ("student", "student"), ("teacher", "teacher"), ("hr", "HR")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.9), dpi=100)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.imshow(item["crops"][key], interpolation="nearest")
        ax.set_title(label if key == "hr" else f"{label}\n{item['psnr'][key]:.2f} dB", fontsize=10, **PLAIN)
        ax.axis("off")
    fig.suptitle(
        f"{set_name} / {printable(item['image'])}: {side}x{side} crop at x={x}, y={y} "
        f"(PSNR of the whole image: Y channel, border {scale} px)",
        fontsize=10,
        **PLAIN,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # leave room for the suptitle
    fig.savefig(path)
    plt.close(fig)


LINE_NAMES = {"Set5": "dotted: Set5", "Set14": "dashed: Set14"}


def published_sets(sets: list[str], scale: int) -> tuple[list[str], str | None]:
    """The published x4 sets whose lines belong on the plot (those among the measured `sets`, by name: a
    published Set5 line is no yardstick for the validation photos), and a note on what is left out."""
    measured = {name.lower() for name in sets}
    drawn = [name for name in PUBLISHED_X4 if name.lower() in measured] if scale == 4 else []
    if scale != 4:
        return drawn, f"published lines (Set5, Set14) are x4, data.scale is {scale}: not drawn"
    if not drawn:
        return drawn, "published lines are Set5 / Set14 figures: not drawn, as neither set was evaluated"
    return drawn, None


def save_quality_speed_plot(path: Path, table: pd.DataFrame, scale: int, notes: list[str]) -> None:
    """PSNR against ms per 1080p frame (log x): our measured points per set, and the published x4 lines of the
    sets that were measured too (published_sets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    markers = {"bicubic": "s", "teacher": "^", "student": "o"}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    timed = table.dropna(subset=["ms_1080p", "psnr"])
    for i, (set_name, rows) in enumerate(timed.groupby("set", sort=False)):
        for r in rows.itertuples():
            ax.scatter(
                r.ms_1080p, r.psnr, marker=markers[r.method], color=colors[i % len(colors)], s=60, zorder=3
            )
            ax.annotate(
                f"{set_name} {r.method}",
                (r.ms_1080p, r.psnr),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
                **PLAIN,
            )
    drawn, note = published_sets(list(table["set"].unique()), scale)
    notes = [*notes, note] if note else notes
    anchors = []
    styles = {"Set5": ":", "Set14": "--"}
    for set_name in drawn:
        for method, (psnr, _) in PUBLISHED_X4[set_name].items():
            ax.axhline(psnr, color="grey", linestyle=styles[set_name], linewidth=0.8, zorder=1)
            anchors.append((psnr, f"{method} ({set_name}) {psnr:.2f}"))
    ax.set_xscale("log")
    # Labels at 1-2-5 steps in plain numbers; unlabelled minor ticks (labels would collide across decades).
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ms per 1080p frame (log scale)")
    ax.set_ylabel("PSNR (dB, Y channel)")
    ax.set_title("quality vs speed" + (f"\n{'; '.join(notes)}" if notes else ""), fontsize=10, **PLAIN)
    ax.grid(True, which="both", alpha=0.3)
    if anchors:
        # Published anchors have no speed measured here: named on a right-hand axis at their PSNR.
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks([a[0] for a in anchors], [a[1] for a in anchors], fontsize=7, color="dimgrey")
        right.set_ylabel(
            f"published x4 ({', '.join(map(LINE_NAMES.get, drawn))})", fontsize=8, color="dimgrey"
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_figures(folder: Path, results, quality_speed: pd.DataFrame, scale: int, notes: list[str]) -> None:
    """Every kept comparison (evaluation.SetResult.compares) and the quality-vs-speed plot into `folder`."""
    for res in results:
        for i, item in enumerate(res.compares):
            save_compare(
                folder / f"{_safe(res.name)}_{i:02d}_{_safe(item['image'])}.png", res.name, item, scale
            )
    save_quality_speed_plot(folder / "quality_speed.png", quality_speed, scale, notes)
