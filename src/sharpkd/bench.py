"""`sharpkd bench`: ms per frame and FPS of the student (and the teacher) at common video sizes.

Every timing is "frame in, frame out": a float32 frame in host memory goes through
the model and comes back to host memory, so CPU and CUDA figures (torch and ONNX
Runtime alike) include the same copies a real sharpening run pays. One warm-up
run, then the median of `repeats`.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sharpkd.errors import UserError
from sharpkd.timing import (
    SIZES,
    Target,
    cpu_name,
    figure_name,
    frame,
    speed_figures,
    tiled_target,
    time_ms,
    time_target,
    torch_target,
)

DEFAULT_SIZES = "720p,1080p,4k"
STUDENT_PTH = Path("models/student/student.pth")
STUDENT_ONNX = Path("models/export/student.onnx")
TEACHER_DIR = Path("models/teacher")


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    """'720p,1080p,4k' or 'WxH' items -> [(label, height, width)]."""
    out = []
    for token in (t.strip().lower() for t in text.split(",")):
        if not token:
            continue
        if token in SIZES:
            out.append((token, *SIZES[token]))
        elif m := re.fullmatch(r"(\d+)x(\d+)", token):
            if min(int(m[1]), int(m[2])) < 1:
                raise UserError(f"--sizes: {token!r} has a side of 0 pixels; each side must be at least 1")
            out.append((token, int(m[2]), int(m[1])))
        else:
            raise UserError(f"--sizes: unknown size {token!r} (use {', '.join(SIZES)} or WxH, e.g. 640x360)")
    if not out:
        raise UserError("--sizes: no size given")
    return out


def check_output_file(path: Path | None, option: str) -> None:
    """A UserError, before any timing, when `path` (a file to write at the end) is a folder or cannot be
    created (sharpen's check: a file made and removed in its nearest existing folder)."""
    from sharpkd.sharpen import _write_problem

    if path is None:
        return
    problem = f"{path} is a folder; name a file" if path.is_dir() else _write_problem(path)
    if problem:
        raise UserError(f"{option} {path}: {problem}")


def _teacher_target(device: str, tile: int, overlap: int) -> Target:
    try:
        from sharpkd.models.teacher import load_teacher
    except ImportError as exc:
        raise UserError(f"--teacher: the teacher loader is not available ({exc})") from None
    teacher, info = load_teacher(TEACHER_DIR, device)
    teacher.eval()
    name = info.get("name") or info.get("architecture", "teacher")
    return tiled_target(
        "teacher", teacher, int(info.get("scale", 4)), device, tile, overlap, f"{name}, tiled {tile}"
    )


def _tiling(tile: int | None, overlap: int | None) -> tuple[int, int]:
    """The given tile and overlap, params.yaml's infer (sharpen.default_tiling) for those not given."""
    from sharpkd.sharpen import default_tiling

    default_tile, default_overlap = default_tiling()
    return (default_tile if tile is None else tile, default_overlap if overlap is None else overlap)


def _student_files(model_path: Path | None) -> dict[str, Path]:
    """kind (runtime.model_kind) -> file: the given model, or the pipeline's student and exported model."""
    from sharpkd.runtime import model_kind

    if model_path is not None:
        path, kind = model_kind(model_path)
        return {kind: path}
    found = {k: p for k, p in (("checkpoint", STUDENT_PTH), ("onnx", STUDENT_ONNX)) if p.is_file()}
    if not found:
        raise UserError(
            f"no student found ({STUDENT_PTH} or {STUDENT_ONNX}); run `dvc repro distill` / `dvc repro export`, "
            "or pass --model PATH"
        )
    return found


def _devices() -> list[str]:
    from sharpkd.runtime import cuda_available

    return ["cpu"] + (["cuda"] if cuda_available() else [])


def _torchscript_targets(path: Path) -> list[Target]:
    from sharpkd.runtime import load_model

    return [torch_target("student", "torchscript", load_model(path, dev).fn, dev) for dev in _devices()]


def _checkpoint_targets(student) -> list[Target]:
    targets = [torch_target("student", "torch", copy.deepcopy(student).to(dev), dev) for dev in _devices()]
    if "cuda" in _devices():
        half = copy.deepcopy(student).cuda().half()
        targets.append(torch_target("student", "torch", half, "cuda", half=True))
    return targets


def _onnx_targets(onnx: Path, threads: int, notes: list[str], with_int8: bool) -> list[Target]:
    """ONNX Runtime on the CPU (and CUDA); the fp16 file beside it on CUDA, the INT8 one on the CPU."""
    from sharpkd.runtime import onnx_target, ort_cuda_available

    cuda = ort_cuda_available()
    targets = [onnx_target(onnx, dev, threads) for dev in ["cpu"] + (["cuda"] if cuda else [])]
    fp16, int8 = (onnx.with_name(f"{onnx.stem}_{p}.onnx") for p in ("fp16", "int8"))
    if cuda and fp16.is_file():
        targets.append(onnx_target(fp16, "cuda", threads))
    if with_int8 and int8.is_file():  # the export stage's INT8 model, beside the float32 one
        notes.append(f"int8: {int8}")
        targets.append(onnx_target(int8, "cpu", threads))
    return targets


@contextlib.contextmanager
def student_targets(model_path: Path | None, threads: int) -> Iterator[tuple[list[Target], list[str]]]:
    """The student's targets for the given model file (or the pipeline's outputs); notes say what was used."""
    from sharpkd.export import export_onnx
    from sharpkd.models.student import load_student

    files = _student_files(model_path)
    notes: list[str] = []
    targets = _torchscript_targets(files["torchscript"]) if "torchscript" in files else []
    with tempfile.TemporaryDirectory(prefix="sharpkd-bench-") as tmp:
        onnx, exported = files.get("onnx"), False
        if "checkpoint" in files:
            student = load_student(files["checkpoint"])
            notes.append(f"student: {files['checkpoint']} {student.arch_kwargs()}")
            targets += _checkpoint_targets(student)
            if onnx is None:  # no exported model at hand: export one now, so ONNX Runtime is measured too
                onnx, exported = export_onnx(student, Path(tmp) / "student.onnx", opset=17), True
        if onnx is not None:
            notes.append(
                "onnx: exported on the fly from the checkpoint (opset 17)" if exported else f"onnx: {onnx}"
            )
            targets += _onnx_targets(onnx, threads, notes, with_int8=model_path is None)
        yield targets, notes


def _row(t: Target, label: str, x: torch.Tensor) -> dict:
    """A bench row's fields, less the figures."""
    return {
        "model": t.model,
        "runtime": t.runtime,
        "device": t.device,
        "precision": t.precision,
        "how": t.how,
        "size": label,
        "height": x.shape[-2],
        "width": x.shape[-1],
    }


def _time_row(t: Target, x: torch.Tensor, label: str, repeats: int, per_call: int = 1) -> dict:
    """One bench row: the target at one size; a failure (out of memory at 4K, say) is its row's error.
    `per_call`: frames one call of the target runs (a whole clip for the video row)."""
    row = _row(t, label, x)
    try:
        ms = time_target(t, x, repeats) / per_call
        row.update(ms=round(ms, 3), fps=round(1000.0 / ms, 2))
    except (RuntimeError, MemoryError) as exc:
        row.update(ms=None, fps=None, error=str(exc).strip().splitlines()[0][:200])
    return row


def _figures(rows: list[dict]) -> dict[str, float | None]:
    """The rows under the one key scheme (timing.speed_figures): speed.<model>.<runtime>_<device>[_<prec>].<size>."""
    figures: dict[str, float | None] = {}
    for r in rows:
        name = figure_name(r["model"], r["runtime"], r["device"], r["precision"])
        figures.update(speed_figures(name, r["size"], r["ms"], r.get("error")))
    return figures


def run_bench(
    model_path: str | Path | None = None,
    teacher: bool = False,
    sizes: str = DEFAULT_SIZES,
    repeats: int = 5,
    threads: int = 0,
    tile: int | None = None,
    overlap: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every target at every size; returns {"rows": [...], "figures": {flat key: value}, environment...}.
    The teacher's tiling defaults to params.yaml's infer (sharpen.default_tiling)."""
    size_list = parse_sizes(sizes)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    rows: list[dict] = []
    from sharpkd.runtime import resolve_model

    # A models:/ URI is fetched from the MLflow registry first (one clear UserError when it cannot be).
    with student_targets(resolve_model(model_path), threads) as (targets, notes):
        if teacher:
            targets.append(_teacher_target(_devices()[-1], *_tiling(tile, overlap)))
        for label, h, w in size_list:
            x = frame((h, w))
            for t in targets:
                if progress:
                    progress(f"{t.name} {label}")
                rows.append(_time_row(t, x, label, repeats))
            del x
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {
        "rows": rows,
        "figures": _figures(rows),
        "torch_threads": threads,
        "repeats": repeats,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "notes": notes,
    }


def teacher_patch_throughput(lr_side: int, batch_size: int, batches: int = 3, device: str = "cpu") -> dict:
    """LR patches/s of the pipeline's teacher (models/teacher) in batches, as the cache_teacher stage runs it."""
    from sharpkd.models.teacher import load_teacher

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


def render_table(result: dict):
    """A rich Table: one row per model/runtime/device, one column per size ("ms  (fps)")."""
    from rich.table import Table

    sizes = list(dict.fromkeys(r["size"] for r in result["rows"]))
    gpu = f", GPU {result['gpu']}" if result["gpu"] else ", no CUDA"
    table = Table(
        title="sharpkd bench: ms per frame (frames/s)",
        caption=f"median of {result['repeats']} after warm-up; torch threads {result['torch_threads']}; "
        f"CPU {result['cpu']}{gpu}",
    )
    for col in ("model", "runtime", "device", "precision", "how"):
        table.add_column(col)
    for s in sizes:
        table.add_column(s, justify="right")
    groups: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["model"], r["runtime"], r["device"], r["precision"], r["how"]), {})[
            r["size"]
        ] = r
    for key, by_size in groups.items():
        cells = []
        for s in sizes:
            r = by_size.get(s)
            if r is None:
                cells.append("")
            elif r["ms"] is None:
                cells.append(f"[red]failed[/red]: {r['error'][:40]}")
            else:
                cells.append(f"{r['ms']:.1f} ({r['fps']:.1f})")
        table.add_row(*key, *cells)
    return table


# --------------------------------------------------------------------------- video, end to end

VIDEO_SIZES = "1080p"
VIDEO_FRAMES = 150  # 5 s at 30 fps: the start (opening, the first frame) and the encoder's flush count little
STUDENT_INT8 = Path("models/export/student_int8.onnx")


def bench_clip(path: Path, size: tuple[int, int], frames: int, fps: int = 30) -> Path:
    """A clip of (height, width) standing for camera footage: a slow pan across a photo (scikit-image's
    coffee, upscaled) with a little grain, H.264 4:2:0, crf 18 (a flat or pure-noise clip would decode and
    encode unusually fast or slow)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from sharpkd.video import write_clip

    h, w = size
    big_w, big_h = w + max(w // 4, 2 * frames), h + max(h // 4, frames)
    photo = np.asarray(Image.fromarray(data.coffee()).resize((big_w, big_h), Image.BICUBIC), dtype=np.int16)
    rng = np.random.default_rng(0)

    def pan():
        for i in range(frames):
            x, y = i * (big_w - w) // frames, i * (big_h - h) // frames
            grain = rng.integers(-3, 4, (h, w, 1), dtype=np.int16)
            yield np.clip(photo[y : y + h, x : x + w] + grain, 0, 255).astype(np.uint8)

    return write_clip(path, pan(), fps, options={"crf": "18", "preset": "veryfast"})


def _video_model(model_path: Path | None) -> Path:
    """The model the video rows time: the given one, else the export stage's INT8 student, else its float32 one."""
    if model_path is not None:
        return model_path
    for path in (STUDENT_INT8, STUDENT_ONNX):
        if path.is_file():
            return path
    raise UserError(
        f"no exported student ({STUDENT_INT8} or {STUDENT_ONNX}); run `dvc repro export`, or pass --model PATH"
    )


def _video_devices(path: Path) -> list[str]:
    """Where the model can run: the CPU, and CUDA when its runtime (ONNX Runtime or torch) has it."""
    from sharpkd.runtime import model_kind, ort_cuda_available

    _, kind = model_kind(path)
    cuda = ort_cuda_available() if kind == "onnx" else torch.cuda.is_available()
    return ["cpu"] + (["cuda"] if cuda else [])


def _alone_target(path: Path, device: str, threads: int) -> Target:
    """The model alone, frame in, frame out (timing.py): what the end-to-end row is set against."""
    from sharpkd.runtime import load_model, model_kind, onnx_target

    _, kind = model_kind(path)
    if kind == "onnx":
        return onnx_target(path, device, threads)
    runtime = "torch" if kind == "checkpoint" else "torchscript"
    return torch_target("student", runtime, load_model(path, device).fn, device)


def _video_target(path: Path, device: str, precision: str, clip: Path, opts) -> Target:
    """`sharpkd sharpen clip.mp4` end to end (decode, sharpen, encode, mux; video.sharpen_video) as a timing
    target: one call runs the whole clip. The model is loaded, and run once on a frame, before the timing."""
    from sharpkd.runtime import load_model
    from sharpkd.video import sharing_the_cpu, sharpen_frames, sharpen_video

    def make(x: torch.Tensor):
        model = sharing_the_cpu(load_model(path, device))  # what sharpen_video runs, made and warmed here
        rgb = x.mul(255).round().to(torch.uint8).numpy()
        sharpen_frames(model, rgb, max(rgb.shape[-2:]), 0)  # warm-up: ONNX Runtime's first run allocates
        out = clip.with_name(f"{clip.stem}_sharp_{device}.mp4")
        return lambda: _expect_all(sharpen_video(model, clip, out, opts=opts), clip)

    how = f"end to end: decode, sharpen, {opts.describe()}"
    return Target("student", "video", device, precision, make, how, warmup=0)


def _expect_all(report, clip: Path):
    if report.damaged:
        raise RuntimeError(f"{clip.name}: {report.problem()}")
    return report


def _video_rows(
    path: Path, label: str, size: tuple[int, int], frames: int, clip: Path, threads: int, repeats: int, opts
) -> list:
    """Per device, two bench rows: the model alone and the clip end to end (one run). The model alone is the
    faster of two medians of `repeats`, one just before the clip and one just after, so that a moment of
    load elsewhere on the machine cannot flatter the ratio."""
    from dataclasses import replace

    from sharpkd.video import NVENC, encoder_available

    rows = []
    x = frame(size)
    for device in _video_devices(path):
        alone = _alone_target(path, device, threads)
        before = _time_row(alone, x, label, repeats)
        dev_opts = replace(opts, codec=NVENC) if device == "cuda" and encoder_available(NVENC) else opts
        target = _video_target(path, device, alone.precision, clip, dev_opts.on(device))
        video = _time_row(target, x, label, 1, per_call=frames) | {"frames": frames}
        after = _time_row(alone, x, label, repeats)
        rows += [min(before, after, key=lambda r: r["ms"] or float("inf")), video]
    return rows


def video_summary(rows: list[dict]) -> list[dict]:
    """Per device and size: end-to-end frames/s against the model alone's, measured in the same run."""
    alone = {(r["device"], r["size"]): r for r in rows if r["runtime"] != "video"}
    out = []
    for r in rows:
        a = alone.get((r["device"], r["size"]))
        if r["runtime"] != "video" or a is None:
            continue
        ratio = round(r["fps"] / a["fps"], 3) if r["fps"] and a["fps"] else None
        out.append(
            {"device": r["device"], "size": r["size"], "end_to_end_fps": r["fps"], "model_fps": a["fps"],
             "ratio": ratio, "how": r["how"], "model": f"{a['runtime']} {a['precision']}"}
        )  # fmt: skip
    return out


def run_video_bench(model_path: str | Path | None = None, sizes: str = VIDEO_SIZES, frames: int = VIDEO_FRAMES,
                    repeats: int = 5, threads: int = 0, opts=None, progress=None) -> dict:  # fmt: skip
    """`sharpkd bench --video`: a clip (bench_clip) sharpened end to end, and the model alone, at each size and
    on each device; the same result shape as run_bench, plus "video": the end-to-end / model-alone ratios."""
    from sharpkd.runtime import resolve_model
    from sharpkd.video import VideoOptions, check_options

    opts = opts or VideoOptions()
    check_options(opts)
    if frames < 2:
        raise UserError(f"--frames must be at least 2, got {frames}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    path = _video_model(resolve_model(model_path))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sharpkd-bench-video-") as tmp:
        for label, h, w in parse_sizes(sizes):
            if progress:
                progress(f"video {label}")
            clip = bench_clip(Path(tmp) / f"clip_{label}.mp4", (h, w), frames)
            rows += _video_rows(path, label, (h, w), frames, clip, threads, repeats, opts)
    return {
        "rows": rows,
        "figures": _figures(rows),
        "video": video_summary(rows),
        "torch_threads": threads,
        "repeats": repeats,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "notes": [
            f"video: {path}, {frames}-frame clip (a pan across a photo, H.264 4:2:0, 30 fps); "
            f"model alone: the faster of two medians of {repeats}, just before and just after the clip; "
            "end to end: one run of the clip"
        ],  # fmt: skip
    }


def video_lines(result: dict) -> list[str]:
    """The video rows' ratios, one line each."""
    return [
        f"video {v['size']} on {v['device']}: end to end {v['end_to_end_fps']} frames/s = "
        f"{v['ratio']} of the model alone ({v['model']}, {v['model_fps']} frames/s); {v['how']}"
        for v in result.get("video", [])
    ]
