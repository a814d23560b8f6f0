"""DVC stage `evaluate`: bicubic vs teacher vs student on the validation split and on extra test sets.

Every HR image is degraded as the pipeline does (the validation split was degraded
by the degrade stage; extra sets from `eval.sets` are degraded here, seeded per
image so the numbers repeat). Three methods are scored against HR with the one
metrics module: the degraded input itself ("bicubic"), the teacher (its cached
output for the validation split, tiled inference on the clean LR image for the
extra sets, as cache_teacher does) and the student (tiled inference on the
degraded input). Speed is one 1080p frame on the device the stage runs on.

Writes (metrics/): eval.json (flat keys for `dvc exp show`), per_image.csv,
quality_speed.csv (DVC plot data) and compare/*.png (aligned crops; quality vs speed).
A bad entry in eval.sets (missing folder, unreadable or too small image) is
reported, recorded in eval.json and skipped; the rest is still evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sharpkd.config import Params
from sharpkd.data.datasets import load_valid
from sharpkd.data.degradation import resize
from sharpkd.data.evalsets import EvalImage, extra_set_images, problem, too_small
from sharpkd.errors import UserError
from sharpkd.fetch import resolve_weights_dir
from sharpkd.files import atomic_dir, atomic_path, write_json
from sharpkd.images import to_image
from sharpkd.inference import default_device, run_tiled, tiled_apply
from sharpkd.metrics import QualityMetrics, mean_scores
from sharpkd.models import count_params
from sharpkd.models.student import conv_macs, load_student
from sharpkd.models.teacher import load_teacher
from sharpkd.progress import progress
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.timing import cpu_name, time_ms

METHODS = ("bicubic", "teacher", "student")
CAPTIONS = {"bicubic": "input (bicubic)", "teacher": "teacher", "student": "student"}
VALID = "valid"  # the validation split's set name (config.py keeps eval.sets from using it)
# DESIGN.md: published Set5 / Set14 x4 numbers (PSNR dB, SSIM), for the quality-vs-speed plot.
PUBLISHED_X4 = {
    "Set5": {
        "bicubic": (28.42, 0.8104),
        "FSRCNN": (30.71, 0.8657),
        "VDSR": (31.35, 0.8838),
        "SwinIR-M": (32.72, 0.9021),
    },
    "Set14": {"bicubic": (26.00, 0.7027), "SwinIR-M": (28.94, 0.7914)},
}
FRAME_1080P = (1080, 1920)


@dataclass
class SetResult:
    name: str
    rows: list[dict] = field(default_factory=list)  # one per image and method
    problems: list[str] = field(default_factory=list)
    compares: list[dict] = field(default_factory=list)

    @property
    def images(self) -> int:
        return len({r["image"] for r in self.rows})


def valid_images(
    pairs_dir: Path, teacher_cache_dir: Path, min_side: int, scale: int, problems: list[str]
) -> Iterator[EvalImage]:
    for im in load_valid(pairs_dir, teacher_cache_dir):
        if im.teacher is not None and im.teacher.shape != im.hr.shape:
            raise UserError(
                f"{teacher_cache_dir}/valid/{im.name}.png is {im.teacher.shape[1]}x{im.teacher.shape[0]}, "
                f"its HR image {im.hr.shape[1]}x{im.hr.shape[0]}: the teacher cache is stale; run `dvc repro cache_teacher`"
            )
        if why := too_small(im.hr, min_side, scale):
            problem(problems, f"{VALID}: {im.name}: {why}")
            continue
        yield EvalImage(im.name, im.hr, im.lr, im.input, im.teacher)


def pick_crop(hr: np.ndarray, degraded: np.ndarray, size: int) -> tuple[int, int, int]:
    """(y, x, side) of the square window where the degraded input lost the most detail (deterministic)."""
    h, w = hr.shape[:2]
    side = min(size, h, w)
    err = np.abs(hr.astype(np.float32) - degraded.astype(np.float32)).mean(axis=2)
    ii = np.pad(err.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, side // 4)
    best, at = -1.0, (0, 0)
    for y in range(0, h - side + 1, step):
        for x in range(0, w - side + 1, step):
            s = ii[y + side, x + side] - ii[y, x + side] - ii[y + side, x] + ii[y, x]
            if s > best:
                best, at = s, (y, x)
    return at[0], at[1], side


def score_set(
    set_name: str,
    images: Iterator[EvalImage],
    methods: dict[str, Callable[[EvalImage], np.ndarray]],
    metrics,
    result: SetResult,
    compare_images: int = 0,
    crop: int = 128,
) -> SetResult:
    """Score each method (name -> image -> uint8 output) against HR on every image.

    Aligned crops of the first `compare_images` images are kept when all of METHODS were scored.
    """
    for im in progress(images, desc=f"evaluate {set_name}", unit="img"):
        outs = {m: fn(im) for m, fn in methods.items()}
        scores = {}
        for method, out in outs.items():
            scores[method] = metrics.score(out, im.hr)
            result.rows.append({"set": set_name, "image": im.name, "method": method, **scores[method]})
        if len(result.compares) < compare_images and set(METHODS) <= set(outs):
            y, x, side = pick_crop(im.hr, im.input, crop)
            window = (slice(y, y + side), slice(x, x + side))
            result.compares.append(
                {
                    "image": im.name,
                    "at": (x, y, side),
                    "crops": {m: outs[m][window].copy() for m in METHODS} | {"hr": im.hr[window].copy()},
                    "psnr": {m: scores[m]["psnr"] for m in METHODS},
                }
            )
    return result


# ---------------------------------------------------------------- speed


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}"


def measure_speed(student, teacher, scale: int, device: torch.device, params: Params) -> dict:
    """ms per 1080p frame (frame in host memory -> frame back in host memory), median after warm-up."""
    ev, tile, overlap = params.eval, params.infer.tile, params.infer.overlap
    h, w = FRAME_1080P
    gen = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 3, h, w, generator=gen)
    lr = torch.rand(1, 3, h // scale, w // scale, generator=gen)
    lr_u8 = to_image(lr)
    out: dict = {}
    with torch.no_grad():
        print(f"[evaluate] timing the student on a 1080p frame ({ev.speed_repeats} repeats)")
        out["student.ms_1080p"] = round(time_ms(lambda: student(frame.to(device)).cpu(), ev.speed_repeats), 3)
        # The baseline the student has to beat costs a resize: the one degrade uses.
        out["bicubic.ms_1080p"] = round(
            time_ms(lambda: resize(lr_u8, (w, h), params.degradation.upscale), ev.speed_repeats), 3
        )
        if ev.teacher_speed_repeats == 0:
            out["teacher.ms_1080p"] = None
            out["teacher.ms_reason"] = "not timed (eval.teacher_speed_repeats: 0)"
        else:
            print(
                f"[evaluate] timing the teacher on a 1080p frame ({ev.teacher_speed_repeats} repeats, tiled {tile})"
            )
            # Warm up on one tile only: a whole extra frame costs a minute for SwinIR-M on a CPU.
            tiled_apply(
                teacher, lr[..., :tile, :tile], scale=scale, tile=tile, overlap=overlap, device=device
            )
            ms = time_ms(
                lambda: tiled_apply(teacher, lr, scale=scale, tile=tile, overlap=overlap, device=device),
                ev.teacher_speed_repeats,
                warmup=0,
            )
            out["teacher.ms_1080p"] = round(ms, 3)
    t, s = out["teacher.ms_1080p"], out["student.ms_1080p"]
    out["speedup"] = round(t / s, 2) if t is not None and s > 0 else None
    out["timing.device"] = _device_name(device)
    out["timing.torch_threads"] = torch.get_num_threads()
    out["timing.repeats"] = ev.speed_repeats
    out["timing.teacher_repeats"] = ev.teacher_speed_repeats
    return out


# ---------------------------------------------------------------- figures


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
        ax.set_title(label if key == "hr" else f"{label}\n{item['psnr'][key]:.2f} dB", fontsize=10)
        ax.axis("off")
    fig.suptitle(
        f"{set_name} / {item['image']}: {side}x{side} crop at x={x}, y={y} "
        f"(PSNR of the whole image: Y channel, border {scale} px)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # leave room for the suptitle
    fig.savefig(path)
    plt.close(fig)


def save_quality_speed_plot(path: Path, table: pd.DataFrame, scale: int, notes: list[str]) -> None:
    """PSNR against ms per 1080p frame (log x): our measured points per set, published x4 anchors as lines."""
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
            )
    anchors = []
    if scale == 4:
        styles = {"Set5": ":", "Set14": "--"}
        for set_name, methods in PUBLISHED_X4.items():
            for method, (psnr, _) in methods.items():
                ax.axhline(psnr, color="grey", linestyle=styles[set_name], linewidth=0.8, zorder=1)
                anchors.append((psnr, f"{method} ({set_name}) {psnr:.2f}"))
    else:
        notes = [*notes, f"published anchors are x4; data.scale is {scale}"]
    ax.set_xscale("log")
    # Labels at 1-2-5 steps in plain numbers; unlabelled minor ticks (labels would collide across decades).
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ms per 1080p frame (log scale)")
    ax.set_ylabel("PSNR (dB, Y channel)")
    ax.set_title("quality vs speed" + (f"\n{'; '.join(notes)}" if notes else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if anchors:
        # Published anchors have no speed measured here: named on a right-hand axis at their PSNR.
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks([a[0] for a in anchors], [a[1] for a in anchors], fontsize=7, color="dimgrey")
        right.set_ylabel("published x4 (dotted: Set5, dashed: Set14)", fontsize=8, color="dimgrey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- the stage


def _round(v):
    return None if v is None else round(float(v), 5)


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Run the evaluation and write metrics/{eval.json, per_image.csv, quality_speed.csv, compare/}."""
    ev, scale = params.eval, params.data.scale
    pairs_dir, teacher_cache_dir, metrics_dir = paths.pairs, paths.teacher_cache, paths.metrics
    teacher_dir, student_path = paths.teacher, paths.student / "student.pth"
    if not (teacher_cache_dir / "cache.json").is_file():
        raise UserError(
            f"{teacher_cache_dir / 'cache.json'} not found: the teacher cache is missing or incomplete; run `dvc repro cache_teacher`"
        )
    if params.compute.threads:
        torch.set_num_threads(params.compute.threads)
    device = default_device()
    student = load_student(student_path, device)
    teacher, info = load_teacher(teacher_dir, device)
    if info["scale"] != scale:
        raise UserError(
            f"{teacher_dir}: the teacher is x{info['scale']} but data.scale is {scale}; run `dvc repro`"
        )
    metrics = QualityMetrics(scale, lpips=ev.lpips, weights_dir=resolve_weights_dir(params.weights.dir))
    tile, overlap = params.infer.tile, params.infer.overlap

    def teacher_fn(im: EvalImage) -> np.ndarray:
        if im.teacher is not None:
            return im.teacher
        return run_tiled(teacher, im.lr, scale, tile, overlap, device=device)

    methods = {
        "bicubic": lambda im: im.input,
        "teacher": teacher_fn,
        "student": lambda im: run_tiled(student, im.input, 1, tile, overlap, align=scale, device=device),
    }

    results: list[SetResult] = []
    res = SetResult(VALID)
    score_set(
        VALID,
        valid_images(pairs_dir, teacher_cache_dir, metrics.min_side, scale, res.problems),
        methods,
        metrics,
        res,
        ev.compare_images,
        ev.crop,
    )
    if not res.rows:
        raise UserError(
            f"{pairs_dir}: no validation image could be scored ({'; '.join(res.problems) or 'none listed'})"
        )
    results.append(res)
    for set_name, folder in ev.sets.items():
        res = SetResult(set_name)
        images = extra_set_images(
            set_name, folder, scale, params.degradation, params.seed, metrics.min_side, res.problems
        )
        score_set(set_name, images, methods, metrics, res, ev.compare_images, ev.crop)
        results.append(res)

    speed = measure_speed(student, teacher, scale, device, params)

    summary: dict = {}
    table_rows = []
    for res in results:
        by_method = {m: [r for r in res.rows if r["method"] == m] for m in METHODS}
        for m in METHODS:
            means = (
                mean_scores([{k: r[k] for k in ("psnr", "ssim", "lpips")} for r in by_method[m]])
                if by_method[m]
                else {}
            )
            for k in ("psnr", "ssim", "lpips"):
                summary[f"{res.name}.{m}.{k}"] = _round(means.get(k))
            table_rows.append(
                {
                    "set": res.name,
                    "method": m,
                    "psnr": summary[f"{res.name}.{m}.psnr"],
                    "ssim": summary[f"{res.name}.{m}.ssim"],
                    "ms_1080p": speed[f"{m}.ms_1080p"],
                }
            )
        summary[f"{res.name}.images"] = res.images
        if res.problems:
            summary[f"{res.name}.problems"] = "; ".join(res.problems)
    if metrics.lpips_reason:
        summary["lpips_reason"] = metrics.lpips_reason
    summary["student.params"] = count_params(student)
    summary["student.gmacs_1080p"] = round(conv_macs(student, *FRAME_1080P) / 1e9, 3)
    summary["teacher.architecture"] = info.get("architecture")
    summary["teacher.params"] = info.get("params")
    summary.update(speed)
    summary["problems"] = sum(len(r.problems) for r in results)

    # Outputs: everything first into temporaries, eval.json last.
    per_image = pd.DataFrame(
        [r for res in results for r in res.rows], columns=["set", "image", "method", "psnr", "ssim", "lpips"]
    )
    quality_speed = pd.DataFrame(table_rows, columns=["set", "method", "psnr", "ssim", "ms_1080p"])
    with atomic_path(metrics_dir / "per_image.csv") as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(metrics_dir / "quality_speed.csv") as tmp:
        quality_speed.to_csv(tmp, index=False)
    with atomic_dir(metrics_dir / "compare") as tmp:
        for res in results:
            for i, item in enumerate(res.compares):
                save_compare(
                    tmp / f"{_safe(res.name)}_{i:02d}_{_safe(item['image'])}.png", res.name, item, scale
                )
        notes = [] if speed["teacher.ms_1080p"] is not None else ["teacher not timed"]
        save_quality_speed_plot(tmp / "quality_speed.png", quality_speed, scale, notes)
    write_json(metrics_dir / "eval.json", summary)

    v = {m: summary[f"{VALID}.{m}.psnr"] for m in METHODS}
    print(
        f"[evaluate] validation PSNR: bicubic {v['bicubic']:.2f}, teacher {v['teacher']:.2f}, student {v['student']:.2f} dB; "
        f"student {speed['student.ms_1080p']:.1f} ms/1080p on {speed['timing.device']} ({speed['timing.torch_threads']} threads)"
        + (f", {speed['speedup']}x faster than the teacher" if speed["speedup"] else "")
    )
    tracker.log_metrics(
        {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    )
    tracker.log_artifacts(str(metrics_dir / "compare"), "compare")
    return summary


if __name__ == "__main__":
    run_stage("evaluate", run)
