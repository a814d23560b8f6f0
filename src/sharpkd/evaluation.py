"""Scoring methods against HR: the evaluate stage's tables and export's INT8 quality check use this one loop.

Every HR image is degraded as the pipeline does (the validation split was degraded by the degrade
stage; `eval.sets` folders are degraded by data.evalsets, seeded per image). A method maps an image to
its uint8 output: the degraded input itself ("bicubic"), or a model run through the one tiled
inference path (`tensors.run_tiled`, `model_method`); `score_set` scores each against HR with
`metrics.QualityMetrics`. Means are `<set>.<method>.<metric>` (eval.json's keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sharpkd.config import Params
from sharpkd.data.datasets import load_valid
from sharpkd.data.degradation import resize
from sharpkd.data.evalsets import EvalImage, extra_set_images, problem, too_small
from sharpkd.deploy.timing import FRAME_1080P, Target, figure_name, measure, speed_figures, speed_key
from sharpkd.errors import UserError
from sharpkd.metrics import mean_scores
from sharpkd.models import count_params
from sharpkd.models.student import conv_macs
from sharpkd.progress import progress
from sharpkd.tensors import run_tiled, to_image
from sharpkd.torch_timing import downscale, tiled_target, timing_context, torch_target

METHODS = ("bicubic", "teacher", "student")
VALID = "valid"  # the validation split's set name (config.py keeps eval.sets from using it)
QUALITY = ("psnr", "ssim", "lpips")
# What each method's speed figure times (timing.figure_name): the bicubic baseline is a resize on the CPU.
SPEED_RUNTIMES = {"bicubic": "resize", "teacher": "torch", "student": "torch"}
Method = Callable[[EvalImage], np.ndarray]


@dataclass
class SetResult:
    name: str
    rows: list[dict] = field(default_factory=list)  # one per image and method
    problems: list[str] = field(default_factory=list)
    compares: list[dict] = field(default_factory=list)
    folder: str = ""  # where its images come from

    @property
    def images(self) -> int:
        return len({r["image"] for r in self.rows})


def valid_images(
    pairs_dir: Path, teacher_cache_dir: Path | None, min_side: int, scale: int, problems: list[str]
) -> Iterator[EvalImage]:
    """The validation split (with the teacher's cached outputs when `teacher_cache_dir` is given)."""
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


def eval_sets(
    params: Params, pairs_dir: Path, teacher_cache_dir: Path | None, min_side: int
) -> Iterator[tuple[SetResult, Iterator[EvalImage]]]:
    """(result to fill, images) of the validation split, then of every eval.sets folder."""
    scale = params.data.scale
    res = SetResult(VALID, folder=str(pairs_dir))
    yield res, valid_images(pairs_dir, teacher_cache_dir, min_side, scale, res.problems)
    for name, folder in params.eval.sets.items():
        res = SetResult(name, folder=str(folder))
        yield (
            res,
            extra_set_images(name, folder, scale, params.degradation, params.seed, min_side, res.problems),
        )


def model_method(
    model: Callable,
    tile: int,
    overlap: int,
    *,
    use: str = "input",
    scale: int = 1,
    align: int = 1,
    device=None,
) -> Method:
    """`model` over an image's `use` (input: the student's; lr: the teacher's) through the tiled inference;
    `scale` is its output/input size ratio, `align` the grid its tiles start on (the student's scale)."""
    return lambda im: run_tiled(model, getattr(im, use), scale, tile, overlap, align=align, device=device)


def teacher_method(teacher: Callable, scale: int, tile: int, overlap: int, device=None) -> Method:
    """The teacher's cached output where there is one (the validation split), else the teacher run tiled."""
    run = model_method(teacher, tile, overlap, use="lr", scale=scale, device=device)
    return lambda im: im.teacher if im.teacher is not None else run(im)


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


def _compare(im: EvalImage, outs: dict[str, np.ndarray], scores: dict[str, dict], crop: int) -> dict:
    """Aligned crops of every method's output and HR, for the comparison figures (report.save_compare)."""
    y, x, side = pick_crop(im.hr, im.input, crop)
    window = (slice(y, y + side), slice(x, x + side))
    return {
        "image": im.name,
        "at": (x, y, side),
        "crops": {m: outs[m][window].copy() for m in METHODS} | {"hr": im.hr[window].copy()},
        "psnr": {m: scores[m]["psnr"] for m in METHODS},
    }


def score_set(
    set_name: str,
    images: Iterable[EvalImage],
    methods: dict[str, Method],
    metrics,
    result: SetResult,
    compare_images: int = 0,
    crop: int = 128,
    desc: str = "evaluate",
) -> SetResult:
    """Score each method (name -> image -> uint8 output) against HR on every image.

    Aligned crops of the first `compare_images` images are kept when all of METHODS were scored.
    """
    for im in progress(images, desc=f"{desc} {set_name}", unit="img"):
        outs = {m: fn(im) for m, fn in methods.items()}
        scores = {}
        for method, out in outs.items():
            scores[method] = metrics.score(out, im.hr)
            result.rows.append({"set": set_name, "image": im.name, "method": method, **scores[method]})
        if len(result.compares) < compare_images and set(METHODS) <= set(outs):
            result.compares.append(_compare(im, outs, scores, crop))
    return result


def score_sets(sets, methods: dict[str, Method], metrics, compare_images: int, crop: int) -> list[SetResult]:
    """score_set over `eval_sets(...)`; a validation split with nothing scored is an error."""
    results = []
    for res, images in sets:
        score_set(res.name, images, methods, metrics, res, compare_images, crop)
        if res.name == VALID and not res.rows:
            raise UserError(
                f"{res.folder}: no validation image could be scored ({'; '.join(res.problems) or 'none listed'})"
            )
        results.append(res)
    return results


def method_means(result: SetResult, method: str) -> dict:
    """Mean psnr / ssim / lpips of one method over a set ({} when it scored nothing)."""
    rows = [{k: r[k] for k in QUALITY} for r in result.rows if r["method"] == method]
    return mean_scores(rows) if rows else {}


def _round(v):
    return None if v is None else round(float(v), 5)


def speed_name(method: str, device: str = "cpu") -> str:
    """The figure (timing.figure_name) evaluate writes for a method timed on `device` (cpu | cuda)."""
    runtime = SPEED_RUNTIMES[method]
    return figure_name(method, runtime, "cpu" if runtime == "resize" else device)


def summarize(
    results: list[SetResult], speed: dict, lpips_reason: str | None, facts: dict
) -> tuple[dict, list[dict]]:
    """eval.json (`<set>.<method>.<metric>`, `<set>.images`, `<set>.problems`, then `lpips_reason`, `facts`,
    the speed figures and the count of problems) and the rows of quality_speed.csv (set, method, psnr,
    ssim, ms_1080p: that method's 1080p figure)."""
    device = speed["timing.device"].split(":")[0]
    summary: dict = {}
    table = []
    for res in results:
        for m in METHODS:
            means = method_means(res, m)
            summary |= {f"{res.name}.{m}.{k}": _round(means.get(k)) for k in QUALITY}
            ms = speed[speed_key(speed_name(m, device))]
            q = {k: summary[f"{res.name}.{m}.{k}"] for k in ("psnr", "ssim")}
            table.append({"set": res.name, "method": m, **q, "ms_1080p": ms})
        summary[f"{res.name}.images"] = res.images
        if res.problems:
            summary[f"{res.name}.problems"] = "; ".join(res.problems)
    if lpips_reason:
        summary["lpips_reason"] = lpips_reason
    summary |= facts | speed | {"problems": sum(len(r.problems) for r in results)}
    return summary, table


def headline(summary: dict) -> str:
    """The stage's one line: validation PSNR of each method, the student's speed and where it was measured."""
    v = {m: summary[f"{VALID}.{m}.psnr"] for m in METHODS}
    device = summary["timing.device"]
    ms = summary[speed_key(speed_name("student", device.split(":")[0]))]
    faster = f", {summary['speedup']}x faster than the teacher" if summary["speedup"] else ""
    return (
        f"[evaluate] validation PSNR: bicubic {v['bicubic']:.2f}, teacher {v['teacher']:.2f}, student {v['student']:.2f} dB; "
        f"student {ms:.1f} ms/1080p on {device} ({summary['timing.torch_threads']} threads){faster}"
    )


def model_facts(student, teacher_info: dict) -> dict:
    """The student's size and cost per 1080p frame, and which teacher it is compared with."""
    return {
        "student.params": count_params(student),
        "student.gmacs_1080p": round(conv_macs(student, *FRAME_1080P) / 1e9, 3),
        # An ensemble's name ("DCTLSA + PAN (x8 self-ensemble)") and all its parameters: what was scored.
        "teacher.architecture": teacher_info.get("name") or teacher_info.get("architecture"),
        "teacher.params": teacher_info.get("total_params", teacher_info.get("params")),
    }


def per_image_table(results: list[SetResult]) -> pd.DataFrame:
    rows = [r for res in results for r in res.rows]
    return pd.DataFrame(rows, columns=["set", "image", "method", *QUALITY])


def quality_speed_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["set", "method", "psnr", "ssim", "ms_1080p"])


# ---------------------------------------------------------------- speed


def bicubic_target(scale: int, kernel: str) -> Target:
    """The baseline the student has to beat costs a resize: the one degrade uses, LR uint8 -> frame."""

    import torch

    def make(x):
        h, w = x.shape[-2:]
        lr = to_image(downscale(torch.from_numpy(x), scale))
        return lambda: resize(lr, (w, h), kernel)

    return Target("bicubic", SPEED_RUNTIMES["bicubic"], "cpu", "fp32", make)


def eval_speed(student, teacher, scale: int, device, params: Params) -> dict:
    """ms per 1080p frame of the three methods on `device` (timing.measure), the speed-up, and where."""
    ev, dev = params.eval, str(device)
    print(f"[evaluate] timing the student on a 1080p frame ({ev.speed_repeats} repeats)")
    targets = [
        torch_target("student", "torch", student, dev),
        bicubic_target(scale, params.degradation.upscale),
    ]
    out = measure(targets, ev.speed_repeats)
    teacher_name = speed_name("teacher", dev)
    if ev.teacher_speed_repeats == 0:
        out |= speed_figures(teacher_name, FRAME_1080P, None, "not timed (eval.teacher_speed_repeats: 0)")
    else:
        tile, overlap = params.infer.tile, params.infer.overlap
        print(
            f"[evaluate] timing the teacher on a 1080p frame ({ev.teacher_speed_repeats} repeats, tiled {tile})"
        )
        target = tiled_target("teacher", teacher, scale, dev, tile, overlap, f"tiled {tile}")
        out |= measure([target], ev.teacher_speed_repeats)
    t, s = out[speed_key(teacher_name)], out[speed_key(speed_name("student", dev))]
    out["speedup"] = round(t / s, 2) if t is not None and s > 0 else None
    return (
        out | timing_context(ev.speed_repeats, device) | {"timing.teacher_repeats": ev.teacher_speed_repeats}
    )
