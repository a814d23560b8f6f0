"""`sharpkd bench`: ms per frame and FPS of the student (and the teacher) at common video sizes.

Every timing is "frame in, frame out" (deploy/timing.py): a frame in host memory goes through the model
and comes back to host memory, so CPU and CUDA figures (ONNX Runtime and torch alike) include the same
copies a real sharpening run pays. One warm-up run, then the median of `repeats`. An ONNX model needs
nothing more than the light install; a .pt / .pth student and the teacher (`--teacher`) need the
training stack (torch), imported only for them. The video bench: deploy/bench_video.py.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sharpkd.deploy.jobs import write_problem
from sharpkd.deploy.models import checkout_root, load_model, model_kind, resolve_model
from sharpkd.deploy.sessions import ort_cuda_available
from sharpkd.deploy.timing import (
    SIZES,
    Target,
    cpu_name,
    figure_name,
    frame,
    onnx_target,
    speed_figures,
    time_target,
)
from sharpkd.errors import UserError

DEFAULT_SIZES = "720p,1080p,4k"
STUDENT_PTH = Path("models/student/student.pth")
STUDENT_ONNX = Path("models/export/student.onnx")
TEACHER_DIR = Path("models/teacher")
PIPELINE_EXTRA = "pip install 'sharpkd[pipeline]'"


def has_torch() -> bool:
    """Whether torch is installed (the pipeline's install), without importing it."""
    return "torch" in sys.modules or importlib.util.find_spec("torch") is not None


def gpu_name() -> str | None:
    """The CUDA GPU's name where torch is installed and sees one (else None)."""
    if not has_torch():
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def in_checkout(rel: Path) -> Path:
    """`rel` under the current checkout's root (the current folder outside a checkout)."""
    return (checkout_root() or Path.cwd()) / rel


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
    if path is None:
        return
    problem = f"{path} is a folder; name a file" if path.is_dir() else write_problem(path)
    if problem:
        raise UserError(f"{option} {path}: {problem}")


def _teacher_target(device: str, tile: int | None, overlap: int | None) -> Target:
    """The pipeline's teacher (models/teacher), tiled by params.yaml's infer unless told: the training stack."""
    if not has_torch():
        raise UserError(f"--teacher needs the training stack: {PIPELINE_EXTRA}")
    from sharpkd.config import load_params
    from sharpkd.models.teacher_loader import load_teacher
    from sharpkd.torch_timing import tiled_target

    infer = load_params().infer if Path("params.yaml").is_file() else None
    tile = tile if tile is not None else (infer.tile if infer else 256)
    overlap = overlap if overlap is not None else (infer.overlap if infer else 16)
    teacher, info = load_teacher(in_checkout(TEACHER_DIR), device)
    teacher.eval()
    name = info.get("name") or info.get("architecture", "teacher")
    return tiled_target(
        "teacher", teacher, int(info.get("scale", 4)), device, tile, overlap, f"{name}, tiled {tile}"
    )


def _student_files(model_path: Path | None) -> dict[str, Path]:
    """kind (models.model_kind) -> file: the given model, or the checkout's student and exported model
    (the .pth only where torch is installed)."""
    if model_path is not None:
        path, kind = model_kind(model_path)
        return {kind: path}
    pth, onnx = in_checkout(STUDENT_PTH), in_checkout(STUDENT_ONNX)
    found = {k: p for k, p in (("checkpoint", pth), ("onnx", onnx)) if p.is_file()}
    if not has_torch():
        found.pop("checkpoint", None)
    if not found:
        raise UserError(
            f"no student found ({STUDENT_PTH} or {STUDENT_ONNX}); run `dvc repro distill` / `dvc repro export`, "
            "or pass --model PATH"
        )
    return found


def torch_devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _torchscript_targets(path: Path) -> list[Target]:
    from sharpkd.torch_timing import torch_target

    return [
        torch_target("student", "torchscript", load_model(path, d).run.module, d) for d in torch_devices()
    ]


def _checkpoint_targets(student) -> list[Target]:
    from sharpkd.torch_timing import torch_target

    devices = torch_devices()
    targets = [torch_target("student", "torch", copy.deepcopy(student).to(d), d) for d in devices]
    if "cuda" in devices:
        half = copy.deepcopy(student).cuda().half()
        targets.append(torch_target("student", "torch", half, "cuda", half=True))
    return targets


def _onnx_targets(onnx: Path, threads: int, notes: list[str], with_int8: bool) -> list[Target]:
    """ONNX Runtime on the CPU (and CUDA); the fp16 file beside it on CUDA, the INT8 one on the CPU."""
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
    files = _student_files(model_path)
    notes: list[str] = []
    if "torchscript" in files or "checkpoint" in files:
        load_model(
            files.get("torchscript") or files["checkpoint"]
        )  # checked, or one line: the extra to install
    targets = _torchscript_targets(files["torchscript"]) if "torchscript" in files else []
    with tempfile.TemporaryDirectory(prefix="sharpkd-bench-") as tmp:
        onnx, exported = files.get("onnx"), False
        if "checkpoint" in files:
            from sharpkd.models.student import load_student
            from sharpkd.onnx_export import export_onnx

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


def _row(t: Target, label: str, x: np.ndarray) -> dict:
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


def time_row(t: Target, x: np.ndarray, label: str, repeats: int, per_call: int = 1) -> dict:
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
    `threads`: ONNX Runtime's (and torch's) CPU threads, 0: their default. The teacher's tiling defaults to
    params.yaml's infer."""
    size_list = parse_sizes(sizes)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    set_torch_threads(threads)
    rows: list[dict] = []
    spec = resolve_model(model_path)[0] if model_path else None  # a models:/ URI: fetched first
    with student_targets(spec, threads) as (targets, notes):
        if teacher:
            targets.append(_teacher_target(torch_devices()[-1] if has_torch() else "cpu", tile, overlap))
        for label, h, w in size_list:
            x = frame((h, w))
            for t in targets:
                if progress:
                    progress(f"{t.name} {label}")
                rows.append(time_row(t, x, label, repeats))
            del x
    return environment(rows, threads, repeats) | {"notes": notes}


def set_torch_threads(threads: int) -> None:
    """torch's CPU threads as ONNX Runtime's, where torch is installed and threads are given."""
    if threads and has_torch():
        import torch

        torch.set_num_threads(threads)


def environment(rows: list[dict], threads: int, repeats: int) -> dict:
    """A bench result: the rows, their figures, and where and how they were measured."""
    return {
        "rows": rows,
        "figures": _figures(rows),
        "threads": threads or "default",
        "repeats": repeats,
        "cpu": cpu_name(),
        "gpu": gpu_name(),
    }


def render_table(result: dict):
    """A rich Table: one row per model/runtime/device, one column per size ("ms  (fps)")."""
    from rich.table import Table

    sizes = list(dict.fromkeys(r["size"] for r in result["rows"]))
    gpu = f", GPU {result['gpu']}" if result["gpu"] else ", no CUDA"
    table = Table(
        title="sharpkd bench: ms per frame (frames/s)",
        caption=f"median of {result['repeats']} after warm-up; threads {result['threads']}; "
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
