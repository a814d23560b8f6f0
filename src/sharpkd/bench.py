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
            out.append((token, int(m[2]), int(m[1])))
        else:
            raise UserError(f"--sizes: unknown size {token!r} (use {', '.join(SIZES)} or WxH, e.g. 640x360)")
    if not out:
        raise UserError("--sizes: no size given")
    return out


def _teacher_target(device: str, tile: int, overlap: int) -> Target:
    try:
        from sharpkd.models.teacher import load_teacher
    except ImportError as exc:
        raise UserError(f"--teacher: the teacher loader is not available ({exc})") from None
    teacher, info = load_teacher(TEACHER_DIR, device)
    teacher.eval()
    name = info.get("architecture", "teacher")
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


def _time_row(t: Target, x: torch.Tensor, label: str, repeats: int) -> dict:
    """One bench row: the target at one size; a failure (out of memory at 4K, say) is its row's error."""
    row = {
        "model": t.model,
        "runtime": t.runtime,
        "device": t.device,
        "precision": t.precision,
        "how": t.how,
        "size": label,
        "height": x.shape[-2],
        "width": x.shape[-1],
    }
    try:
        ms = time_target(t, x, repeats)
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
    with student_targets(Path(model_path) if model_path else None, threads) as (targets, notes):
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
