"""DVC stage `export`: the trained student as ONNX (float32, float16) and TorchScript, checked against
PyTorch, timed, described by a model card -> models/export/, metrics/export.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sharpkd import __version__
from sharpkd.config import PIPELINE_GROUPS, Params, flatten
from sharpkd.data.datasets import TrainPatches, load_valid
from sharpkd.data.evalsets import extra_set_images
from sharpkd.errors import UserError
from sharpkd.export import (
    FRAME_1080P,
    check_parity,
    export_onnx,
    export_torchscript,
    measure_speed,
    parity_inputs,
)
from sharpkd.fetch import file_digest
from sharpkd.files import atomic_dir, write_json
from sharpkd.inference import run_tiled
from sharpkd.metrics import QualityMetrics, mean_scores
from sharpkd.models import count_params
from sharpkd.models.student import Student, conv_macs, load_student
from sharpkd.quantize import quantize_student
from sharpkd.runtime import OnnxFunction, ort_session
from sharpkd.pipeline import StagePaths, run_stage

# ---------------------------------------------------------------- model card


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
        "files": {name: {"bytes": p.stat().st_size, "sha256": file_digest(p)} for name, p in files.items()},
        "teacher": teacher,
        "data": data,
        "training": training,
        # Everything that made the model; not where its runs are recorded (tracking.*).
        "params_used": flatten({g: getattr(params, g) for g in PIPELINE_GROUPS}),
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


def export_int8(params: Params, paths: StagePaths, fp32_path: Path, int8_path: Path) -> dict:
    """student_int8.onnx calibrated on training-input crops, and what it costs against the float32 model
    in PSNR / SSIM on the validation split and every eval.sets entry (same images, same tiling)."""
    scale, tile, overlap = params.data.scale, params.infer.tile, params.infer.overlap
    draw = TrainPatches(paths.pairs, keys=("input",), patch_size=params.data.patch_size).batch_fn(
        params.export.int8_calibration, params.seed
    )
    info = quantize_student(fp32_path, int8_path, [c[None].numpy() for c in draw(0)["input"]])
    out: dict = {
        "int8.calibration_images": info["calibration_images"],
        "int8.method": info["method"],
        "int8.quantized_ops": json.dumps(info["quantized_ops"]),
        "int8.head": info["head"],
        "int8.uint8_rearrangements": json.dumps(info["uint8_rearrangements"]),
    }
    metrics = QualityMetrics(scale, lpips=False)
    sets = {"valid": [(im.input, im.hr) for im in load_valid(paths.pairs)]}
    for name, folder in params.eval.sets.items():
        found = extra_set_images(name, folder, scale, params.degradation, params.seed, metrics.min_side, [])
        sets[name] = [(im.input, im.hr) for im in found]
    scores = {}
    for precision, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = OnnxFunction(ort_session(path, "cpu", torch.get_num_threads()))
        for name, images in sets.items():
            outs = [run_tiled(session, x, 1, tile, overlap, align=scale) for x, _ in images]
            rows = [metrics.score(out, hr) for out, (_, hr) in zip(outs, images, strict=True)]
            scores[name, precision] = mean_scores(rows)
        del session  # one live session at a time (see export.measure_speed)
    for name in sets:
        for k in ("psnr", "ssim"):
            fp32, int8 = scores[name, "fp32"].get(k), scores[name, "int8"].get(k)
            out[f"int8.{name}.{k}_fp32"], out[f"int8.{name}.{k}_int8"] = fp32, int8
            out[f"int8.{name}.{k}_cost"] = None if fp32 is None or int8 is None else round(fp32 - int8, 5)
    print(
        "[export] INT8: "
        + ", ".join(f"{n} {out[f'int8.{n}.psnr_cost']} dB PSNR below float32" for n in sets)
        + f" ({info['quantized_ops']} quantised)"
    )
    return out


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Export, check parity (float32 beyond export.parity_tol is an error), time, write the model card."""
    ep = params.export
    student_path, out_dir = paths.student / "student.pth", paths.export
    valid_dir, metrics_path = paths.pairs / "valid" / "input", paths.metrics / "export.json"
    teacher_dir, manifest, eval_path = paths.teacher, paths.raw / "manifest.csv", paths.metrics / "eval.json"
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
        if ep.int8:
            files["student_int8.onnx"] = tmp / "student_int8.onnx"
            metrics.update(export_int8(params, paths, files["student.onnx"], files["student_int8.onnx"]))
        metrics.update(
            measure_speed(
                model,
                files["student.onnx"],
                files["student.pt"],
                files.get("student_fp16.onnx"),
                ep.speed_repeats,
                files.get("student_int8.onnx"),
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


if __name__ == "__main__":
    run_stage("export", run)
