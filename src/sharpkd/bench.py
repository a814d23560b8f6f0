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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sharpkd.errors import UserError
from sharpkd.timing import cpu_name, time_ms

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160), "2160p": (3840, 2160)}
DEFAULT_SIZES = "720p,1080p,4k"
STUDENT_PTH = Path("models/student/student.pth")
STUDENT_ONNX = Path("models/export/student.onnx")
TEACHER_DIR = Path("models/teacher")


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    """'720p,1080p,4k' or 'WxH' items -> [(label, width, height)]."""
    out = []
    for token in (t.strip().lower() for t in text.split(",")):
        if not token:
            continue
        if token in SIZES:
            out.append((token, *SIZES[token]))
        elif m := re.fullmatch(r"(\d+)x(\d+)", token):
            out.append((token, int(m[1]), int(m[2])))
        else:
            raise UserError(f"--sizes: unknown size {token!r} (use {', '.join(SIZES)} or WxH, e.g. 640x360)")
    if not out:
        raise UserError("--sizes: no size given")
    return out


@dataclass
class Target:
    """One thing to time: `make(x)` returns a zero-argument callable running one frame `x` (1,3,H,W on the CPU)."""

    model: str  # student | teacher
    runtime: str  # torch | torchscript | onnxruntime
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | int8
    make: Callable[[torch.Tensor], Callable[[], object]]
    how: str = "full frame"

    @property
    def key(self) -> str:
        return figure_key(self.model, self.runtime, self.device, self.precision)


def figure_key(model: str, runtime: str, device: str, precision: str) -> str:
    """e.g. student.onnxruntime_cpu, student.torch_cuda_fp16 (the prefix of the flat JSON keys)."""
    prec = "" if precision == "fp32" else f"_{precision}"
    return f"{model}.{runtime}_{device}{prec}"


def _torch_target(
    model: str, runtime: str, module: torch.nn.Module, device: str, half: bool = False
) -> Target:
    def make(x: torch.Tensor):
        dtype = torch.float16 if half else torch.float32

        @torch.no_grad()
        def run():
            return module(x.to(device, dtype)).float().cpu()

        return run

    return Target(model, runtime, device, "fp16" if half else "fp32", make)


def _onnx_target(path: Path, device: str, threads: int) -> Target:
    from sharpkd.runtime import OnnxFunction, ort_session

    fn = OnnxFunction(ort_session(path, device, threads))  # opened now: a bad file fails before any timing
    # export.py and quantize.py record the precision in the model's metadata (INT8 keeps float32 I/O).
    recorded = fn.session.get_modelmeta().custom_metadata_map.get("sharpkd.precision")
    precision = recorded or ("fp16" if fn.dtype.__name__ == "float16" else "fp32")
    del fn

    def make(x: torch.Tensor):
        # A session per timing, released after it: an idle session's threads keep spinning for a
        # while after each run and slow the session being timed.
        session = OnnxFunction(ort_session(path, device, threads))
        return lambda: session(x)

    return Target("student", "onnxruntime", device, precision, make)


def _teacher_target(device: str, tile: int, overlap: int) -> Target:
    from sharpkd.inference import tiled_apply

    try:
        from sharpkd.models.teacher import load_teacher
    except ImportError as exc:
        raise UserError(f"--teacher: the teacher loader is not available ({exc})") from None
    teacher, info = load_teacher(TEACHER_DIR, device)
    teacher.eval()
    scale = int(info.get("scale", 4))

    def make(x: torch.Tensor):
        # The teacher maps the low-resolution image to the full frame: feed it x downscaled.
        lr = F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True).clamp(0, 1)
        return lambda: tiled_apply(teacher, lr, scale=scale, tile=tile, overlap=overlap, device=device)

    name = info.get("architecture", "teacher")
    return Target("teacher", "torch", device, "fp32", make, how=f"{name}, tiled {tile}")


@contextlib.contextmanager
def student_targets(model_path: Path | None, threads: int) -> Iterator[tuple[list[Target], list[str]]]:
    """The student's targets for the given model file (or the pipeline's outputs); notes say what was used."""
    from sharpkd.export import export_onnx
    from sharpkd.models.student import load_student
    from sharpkd.runtime import cuda_available, ort_cuda_available

    devices = ["cpu"] + (["cuda"] if cuda_available() else [])
    ort_devices = ["cpu"] + (["cuda"] if ort_cuda_available() else [])
    notes: list[str] = []
    targets: list[Target] = []
    if model_path is None:
        pth, onnx = (p if p.is_file() else None for p in (STUDENT_PTH, STUDENT_ONNX))
        if pth is None and onnx is None:
            raise UserError(
                f"no student found ({STUDENT_PTH} or {STUDENT_ONNX}); run `dvc repro distill` / `dvc repro export`, "
                "or pass --model PATH"
            )
    else:
        if not model_path.is_file():
            raise UserError(f"{model_path}: model not found")
        suffix = model_path.suffix.lower()
        if suffix not in (".pth", ".pt", ".onnx"):
            raise UserError(f"{model_path}: unknown model type '{suffix}' (use .pth, .pt or .onnx)")
        pth = model_path if suffix == ".pth" else None
        onnx = model_path if suffix == ".onnx" else None
        if suffix == ".pt":
            from sharpkd.runtime import load_model

            for dev in devices:
                targets.append(_torch_target("student", "torchscript", load_model(model_path, dev).fn, dev))
    with tempfile.TemporaryDirectory(prefix="sharpkd-bench-") as tmp:
        if pth is not None:
            student = load_student(pth)
            notes.append(f"student: {pth} {student.arch_kwargs()}")
            for dev in devices:
                targets.append(_torch_target("student", "torch", copy.deepcopy(student).to(dev), dev))
            if "cuda" in devices:
                targets.append(
                    _torch_target("student", "torch", copy.deepcopy(student).cuda().half(), "cuda", half=True)
                )
        if onnx is None and pth is not None:
            # No exported model at hand: export one now, so ONNX Runtime is measured too.
            onnx = export_onnx(student, Path(tmp) / "student.onnx", opset=17)
            notes.append("onnx: exported on the fly from the checkpoint (opset 17)")
        elif onnx is not None:
            notes.append(f"onnx: {onnx}")
        if onnx is not None:
            for dev in ort_devices:
                targets.append(_onnx_target(onnx, dev, threads))
            fp16 = onnx.with_name(f"{onnx.stem}_fp16.onnx")
            if "cuda" in ort_devices and fp16.is_file():
                targets.append(_onnx_target(fp16, "cuda", threads))
            int8 = onnx.with_name(f"{onnx.stem}_int8.onnx")
            if model_path is None and int8.is_file():  # the export stage's INT8 model, beside the float32 one
                notes.append(f"int8: {int8}")
                targets.append(_onnx_target(int8, "cpu", threads))
        yield targets, notes


def run_bench(
    model_path: str | Path | None = None,
    teacher: bool = False,
    sizes: str = DEFAULT_SIZES,
    repeats: int = 5,
    threads: int = 0,
    tile: int = 256,
    overlap: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every target at every size; returns {"rows": [...], "figures": {flat key: value}, environment...}."""
    size_list = parse_sizes(sizes)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    rows: list[dict] = []
    with student_targets(Path(model_path) if model_path else None, threads) as (targets, notes):
        if teacher:
            from sharpkd.runtime import cuda_available

            targets.append(_teacher_target("cuda" if cuda_available() else "cpu", tile, overlap))
        gen = torch.Generator().manual_seed(0)
        for label, w, h in size_list:
            x = torch.rand(1, 3, h, w, generator=gen)
            for t in targets:
                if progress:
                    progress(f"{t.key} {label}")
                row = {
                    "model": t.model,
                    "runtime": t.runtime,
                    "device": t.device,
                    "precision": t.precision,
                    "how": t.how,
                    "size": label,
                    "width": w,
                    "height": h,
                }
                try:
                    ms = time_ms(t.make(x), repeats)
                    row.update(ms=round(ms, 3), fps=round(1000.0 / ms, 2))
                except (RuntimeError, MemoryError) as exc:
                    # e.g. out of memory at 4K: report it and time the rest.
                    row.update(ms=None, fps=None, error=str(exc).strip().splitlines()[0][:200])
                rows.append(row)
            del x
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    figures: dict[str, float | None] = {}
    for r in rows:
        key = figure_key(r["model"], r["runtime"], r["device"], r["precision"])
        figures[f"{key}.{r['size']}.ms"] = r["ms"]
        figures[f"{key}.{r['size']}.fps"] = r["fps"]
    return {
        "rows": rows,
        "figures": figures,
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
        "teacher": info.get("architecture", "teacher"),
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
    import contextlib

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
