"""The `export` stage: the trained student as ONNX (float32 and float16) and TorchScript,
checked against PyTorch, timed, and described by a model card.

Export path: `torch.onnx.export(..., dynamo=False)`, the TorchScript-based exporter. The
torch.export-based one (torch's default) needs the `onnxscript` package, which the
pipeline does not depend on, and the student's graph (convs, replicate padding computed
from the input size, pixel (un)shuffle) exports exactly with the classic exporter:
padding to a multiple of the scale stays symbolic, so odd sizes work (checked below).

float16 variant: exported from a `.half()` copy of the model, so its input and output
are float16 too (ONNX Runtime on a GPU runs it natively; `runtime.OnnxFunction` casts at
the boundary). onnxconverter-common's `convert_float_to_float16` would keep float32 I/O,
but it is not a dependency and the half export needs nothing extra.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from sharpkd import __version__
from sharpkd.config import Params, flatten
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.models.student import Student, conv_macs, count_params, load_student
from sharpkd.runtime import SCALE_KEY, OnnxFunction, ort_cuda_available, ort_session

# Odd sizes whose padding to a multiple of the scale differs (and a batch of 2).
PARITY_SHAPES = [(1, 3, 37, 53), (2, 3, 65, 31)]
FRAME_1080P = (1080, 1920)


def export_onnx(model: Student, path: str | Path, opset: int = 17, fp16: bool = False) -> Path:
    """Write `model` as ONNX with dynamic batch, height and width; the student's scale goes into the metadata."""
    import onnx

    path = Path(path)
    m = copy.deepcopy(model).cpu().eval()
    dtype = torch.float16 if fp16 else torch.float32
    m = m.to(dtype)
    # An odd dummy size, so the traced padding is the general case, not a no-op.
    dummy = torch.rand(1, 3, 67, 45, dtype=dtype)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            # The classic exporter warns that it is deprecated and that shapes are traced.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                m,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": axes, "output": axes},
                do_constant_folding=True,
            )
    except Exception as exc:  # an unsupported opset or operator: say which, without a traceback
        raise UserError(
            f"{path}: ONNX export failed at opset {opset} ({type(exc).__name__}: {exc})"
        ) from None
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {
        SCALE_KEY: str(model.scale),
        "sharpkd.arch": json.dumps(model.arch_kwargs()),
        "sharpkd.precision": "fp16" if fp16 else "fp32",
        "sharpkd.version": __version__,
        "sharpkd.io": "(N,3,H,W) RGB in [0,1], any H and W; output same shape",
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path


def export_torchscript(model: Student, path: str | Path) -> Path:
    """Scripted (not traced), so the size-dependent padding stays code, not constants."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch, still works
        scripted = torch.jit.script(copy.deepcopy(model).cpu().eval())
        scripted.save(str(path))
    return path


def _load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def parity_inputs(valid_dir: str | Path) -> tuple[list[tuple[str, torch.Tensor]], str | None]:
    """The first validation input image (whole) and random tensors of odd sizes; a note when no image is found."""
    from sharpkd.images import list_images, read_rgb
    from sharpkd.infer import to_tensor

    gen = torch.Generator().manual_seed(0)
    inputs = [(f"random {'x'.join(map(str, s))}", torch.rand(*s, generator=gen)) for s in PARITY_SHAPES]
    valid = Path(valid_dir)
    images = list_images(valid) if valid.is_dir() else []
    if not images:
        return inputs, f"no validation image under {valid}; parity on random tensors only"
    rgb, _ = read_rgb(images[0])
    return [(images[0].name, to_tensor(rgb))] + inputs, None


@torch.no_grad()
def check_parity(model: Student, inputs, onnx_path: Path, ts_path: Path, fp16_path: Path | None) -> dict:
    """Max abs difference against the PyTorch model, over all inputs, for each exported file (CPU)."""
    runners = {
        "onnx_fp32": lambda: OnnxFunction(ort_session(onnx_path)),
        "torchscript": lambda: _load_torchscript(ts_path),
    }
    if fp16_path is not None:
        runners["onnx_fp16"] = lambda: OnnxFunction(ort_session(fp16_path))
    model = model.cpu().eval()
    refs = [model(x) for _, x in inputs]
    out: dict = {}
    for name, make in runners.items():
        try:
            fn = make()
            worst = max(
                float((fn(x).float() - ref).abs().max()) for (_, x), ref in zip(inputs, refs, strict=True)
            )
            out[f"parity.{name}.max_abs"] = worst
        except Exception as exc:  # float16 kernels may be missing on some CPU builds of ORT: record why
            if name != "onnx_fp16":
                raise
            out[f"parity.{name}.max_abs"] = None
            out[f"parity.{name}.reason"] = (
                f"ONNX Runtime CPU could not run it: {str(exc).splitlines()[0][:200]}"
            )
    if fp16_path is None:
        out["parity.onnx_fp16.max_abs"] = None
        out["parity.onnx_fp16.reason"] = "export.fp16 is false"
    return out


def measure_speed(
    model: Student, onnx_path: Path, ts_path: Path, fp16_path: Path | None, repeats: int
) -> dict:
    """ms and fps on one 1080p frame: torch eager (reference), TorchScript and ONNX Runtime on the CPU; CUDA EP when present."""
    from sharpkd.bench import time_ms

    threads = torch.get_num_threads()
    x = torch.rand(1, 3, *FRAME_1080P, generator=torch.Generator().manual_seed(0))
    ts = _load_torchscript(ts_path)
    runs = {
        "torch_cpu": lambda: model(x),
        "torchscript_cpu": lambda: ts(x),
        "onnx_cpu": OnnxFunction(ort_session(onnx_path, "cpu", threads)),
    }
    reasons = {}
    if ort_cuda_available():
        runs["onnx_cuda"] = OnnxFunction(ort_session(onnx_path, "cuda"))
        if fp16_path is not None:
            runs["onnx_fp16_cuda"] = OnnxFunction(ort_session(fp16_path, "cuda"))
        else:
            reasons["onnx_fp16_cuda"] = "export.fp16 is false"
    else:
        reasons["onnx_cuda"] = reasons["onnx_fp16_cuda"] = "no CUDA execution provider in this ONNX Runtime"
    out: dict = {"speed.torch_threads": threads, "speed.repeats": repeats}
    with torch.no_grad():
        for name, fn in runs.items():
            arg_fn = fn if name in ("torch_cpu", "torchscript_cpu") else (lambda f=fn: f(x))
            ms = time_ms(arg_fn, repeats)
            out[f"speed.{name}.ms_1080p"] = round(ms, 3)
            out[f"speed.{name}.fps_1080p"] = round(1000.0 / ms, 2)
    for name, why in reasons.items():
        out[f"speed.{name}.ms_1080p"] = None
        out[f"speed.{name}.reason"] = why
    return out


# ---------------------------------------------------------------- model card


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _data_summary(params: Params, manifest: Path) -> dict:
    d = params.data
    summary: dict = {
        "source": d.source,
        "scale": d.scale,
        "patch_size": d.patch_size,
        "degradation": flatten(params.degradation),
    }
    if manifest.is_file():
        import pandas as pd

        df = pd.read_csv(manifest)
        summary["images"] = (
            {str(k): int(v) for k, v in df.groupby("split").size().items()} if "split" in df else len(df)
        )
        if "source" in df:
            summary["image_sources"] = sorted(map(str, df["source"].dropna().unique()))
        if {"width", "height"} <= set(df.columns):
            summary["width_range"] = [int(df["width"].min()), int(df["width"].max())]
            summary["height_range"] = [int(df["height"].min()), int(df["height"].max())]
    else:
        summary["images"] = f"unknown ({manifest} not found)"
    return summary


INTENDED_USE = (
    "Sharpening photographs and video frames that were enlarged (about x{scale}, bicubic-like) and possibly "
    "JPEG-compressed: it restores edges and fine texture a bicubic upscale blurs, in real time on a CPU or GPU. "
    "The input and output have the same size."
)
LIMITS = [
    "It learns to imitate the teacher on the training data; on other degradations (motion blur, heavy noise, "
    "strong compression) it may do little or add artefacts.",
    "Detail it adds is plausible, not recovered: do not use it for forensics, medical or identification purposes.",
    "Trained on 8-bit sRGB: 16-bit inputs are processed in float and written back in 16 bits, but gain no extra "
    "precision; alpha is carried through unchanged.",
    "The float16 ONNX model takes and returns float16 tensors and is meant for GPUs; on a CPU use the float32 one.",
    "student.pt is TorchScript, which recent PyTorch marks as deprecated; prefer the ONNX files.",
]


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _eval_table(ev: dict) -> str:
    """`<set>.<method>.<metric>` keys as a set x method table; anything else as key/value rows."""
    grid: dict[tuple[str, str], dict[str, float]] = {}
    metrics: list[str] = []
    other = []
    for k, v in ev.items():
        parts = k.split(".")
        if (
            len(parts) == 3
            and isinstance(v, int | float)
            and parts[1] in ("bicubic", "input", "teacher", "student")
        ):
            grid.setdefault((parts[0], parts[1]), {})[parts[2]] = v
            metrics += [parts[2]] if parts[2] not in metrics else []
        elif isinstance(v, int | float | str) or v is None:
            other.append([k, v])
    out = []
    if grid:
        out.append(
            _table(
                ["set", "method", *metrics],
                [[s, m, *(row.get(x) for x in metrics)] for (s, m), row in grid.items()],
            )
        )
    if other:
        out.append(_table(["key", "value"], other))
    return "\n\n".join(out)


def model_card(
    model: Student,
    params: Params,
    files: dict[str, Path],
    metrics: dict,
    *,
    teacher_dir: Path,
    manifest: Path,
    eval_path: Path,
    student_json: Path,
) -> tuple[dict, str]:
    """(model_card.json, model_card.md)."""
    arch = model.arch_kwargs()
    n_params, macs = count_params(model), conv_macs(model, *FRAME_1080P)
    teacher = _read_json(teacher_dir / "teacher.json")
    evaluation = _read_json(eval_path)
    training = _read_json(student_json)
    data = _data_summary(params, manifest)
    card = {
        "name": "sharpkd student",
        "sharpkd_version": __version__,
        "architecture": {
            **arch,
            "description": "pixel-unshuffle by scale -> 3x3 convs on the low-resolution grid -> "
            "pixel-shuffle -> + input (global residual); any input size (replicate-padded to a multiple "
            "of scale inside the model, cropped back)",
        },
        "io": "input (N,3,H,W) float RGB in [0,1], output the same shape (float16 in and out for student_fp16.onnx)",
        "params": n_params,
        "macs_1080p": macs,
        "gmacs_1080p": round(macs / 1e9, 3),
        "files": {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()},
        "teacher": teacher,
        "data": data,
        "training": training,
        "params_used": flatten(params),
        "evaluation": evaluation,
        "parity": {k: v for k, v in metrics.items() if k.startswith("parity.")},
        "speed": {k: v for k, v in metrics.items() if k.startswith("speed.")},
        "intended_use": INTENDED_USE.format(scale=arch["scale"]),
        "limits": LIMITS,
    }
    md = [
        f"# sharpkd student (x{arch['scale']}, {arch['channels']} channels, {arch['blocks']} blocks)",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Limits",
        "",
    ]
    md += [f"- {x}" for x in LIMITS]
    md += [
        "",
        "## Architecture",
        "",
        card["architecture"]["description"] + ".",
        "",
        _table(
            ["item", "value"],
            [
                ["scale", arch["scale"]],
                ["channels", arch["channels"]],
                ["blocks", arch["blocks"]],
                ["activation", arch["activation"]],
                ["parameters", f"{n_params:,}"],
                ["MACs per 1080p frame", f"{macs / 1e9:.2f} G"],
            ],
        ),
        "",
        f"I/O: {card['io']}.",
        "",
        "## Files",
        "",
        _table(
            ["file", "bytes", "sha256"],
            [[n, f["bytes"], f["sha256"][:16] + "..."] for n, f in card["files"].items()],
        ),
        "",
        "## Teacher",
        "",
    ]
    if teacher:
        md.append(
            _table(["item", "value"], [[k, v] for k, v in teacher.items() if not isinstance(v, dict | list)])
        )
    else:
        md.append(f"unknown ({teacher_dir / 'teacher.json'} not found)")
    md += [
        "",
        "## Data",
        "",
        _table(["item", "value"], [[k, v] for k, v in data.items() if k != "degradation"]),
        "",
        "Degradation: " + ", ".join(f"{k}={v}" for k, v in data["degradation"].items()) + ".",
    ]
    md += [
        "",
        "## Evaluation",
        "",
        _eval_table(evaluation) if evaluation else f"not available ({eval_path} not found)",
    ]
    md += [
        "",
        "## Parity with PyTorch (max abs difference, CPU)",
        "",
        _table(["check", "value"], [[k.removeprefix("parity."), v] for k, v in card["parity"].items()]),
    ]
    sp = card["speed"]
    runtimes = dict.fromkeys(k.split(".")[1] for k in sp if k.count(".") == 2)
    md += [
        "",
        f"## Speed (one 1080p frame, median of {sp.get('speed.repeats')}, torch threads {sp.get('speed.torch_threads')})",
        "",
        _table(
            ["runtime", "ms per frame", "frames/s", "note"],
            [
                [
                    r,
                    sp.get(f"speed.{r}.ms_1080p"),
                    sp.get(f"speed.{r}.fps_1080p"),
                    sp.get(f"speed.{r}.reason", ""),
                ]
                for r in runtimes
            ],
        ),
    ]
    md += [
        "",
        "## Params that produced it",
        "",
        _table(["param", "value"], [[k, v] for k, v in card["params_used"].items()]),
        "",
    ]
    return card, "\n".join(md)


# ---------------------------------------------------------------- the stage


def export_student(
    params: Params,
    tracker=None,
    *,
    student_path: str | Path = "models/student/student.pth",
    out_dir: str | Path = "models/export",
    metrics_path: str | Path = "metrics/export.json",
    valid_dir: str | Path = "data/pairs/valid/input",
    eval_path: str | Path = "metrics/eval.json",
    teacher_dir: str | Path = "models/teacher",
    manifest: str | Path = "data/raw/manifest.csv",
) -> dict:
    """Export, check parity (float32 beyond export.parity_tol is an error), time, write the model card."""
    ep = params.export
    student_path, out_dir = Path(student_path), Path(out_dir)
    model = load_student(student_path)
    inputs, parity_note = parity_inputs(valid_dir)
    with atomic_dir(out_dir) as tmp:
        files = {"student.onnx": export_onnx(model, tmp / "student.onnx", ep.opset)}
        if ep.fp16:
            files["student_fp16.onnx"] = export_onnx(model, tmp / "student_fp16.onnx", ep.opset, fp16=True)
        files["student.pt"] = export_torchscript(model, tmp / "student.pt")
        metrics: dict = {
            "opset": ep.opset,
            "params": count_params(model),
            "gmacs_1080p": round(conv_macs(model, *FRAME_1080P) / 1e9, 3),
        }
        metrics["parity.inputs"] = ", ".join(name for name, _ in inputs)
        if parity_note:
            metrics["parity.note"] = parity_note
        metrics.update(
            check_parity(
                model, inputs, files["student.onnx"], files["student.pt"], files.get("student_fp16.onnx")
            )
        )
        for name in ("onnx_fp32", "torchscript"):
            diff = metrics[f"parity.{name}.max_abs"]
            if diff > ep.parity_tol:
                # Nothing is written: atomic_dir drops the temporary folder.
                raise UserError(
                    f"export: {name} output differs from PyTorch by {diff:.3g} "
                    f"(export.parity_tol is {ep.parity_tol:g}); the exported model is not trustworthy"
                )
        metrics.update(
            measure_speed(
                model,
                files["student.onnx"],
                files["student.pt"],
                files.get("student_fp16.onnx"),
                ep.speed_repeats,
            )
        )
        card, md = model_card(
            model,
            params,
            files,
            metrics,
            teacher_dir=Path(teacher_dir),
            manifest=Path(manifest),
            eval_path=Path(eval_path),
            student_json=student_path.parent / "student.json",
        )
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (tmp / "model_card.md").write_text(md)
    write_json(metrics_path, metrics)
    if tracker is not None:
        tracker.log_metrics(
            {
                f"export.{k}": float(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        tracker.log_artifact(out_dir / "model_card.md")
        example = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
        tracker.log_onnx_model(out_dir / "student.onnx", example)
    return metrics
