"""DVC stage `export`: the trained student as ONNX (float32, float16, INT8) and TorchScript, checked against
PyTorch, timed (sharpkd.deploy.timing), described by a model card (sharpkd.model_card) -> models/export/,
metrics/export.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sharpkd.config import Params
from sharpkd.deploy.timing import FRAME_1080P
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.model_card import model_card
from sharpkd.models import count_params
from sharpkd.models.student import conv_macs, load_student
from sharpkd.onnx_export import check_parity, export_onnx, export_torchscript, measure_speed, parity_inputs
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.quantize import export_int8


def check_files(model, files: dict[str, Path], paths: StagePaths, tol: float) -> dict:
    """Parity of the exported files with PyTorch; float32 beyond export.parity_tol is an error."""
    inputs, note = parity_inputs(paths.pairs / "valid" / "input")
    out: dict = {"parity.inputs": ", ".join(name for name, _ in inputs)}
    if note:
        out["parity.note"] = note
    out |= check_parity(
        model, inputs, files["student.onnx"], files["student.pt"], files.get("student_fp16.onnx")
    )
    for name in ("onnx_fp32", "torchscript"):
        diff = out[f"parity.{name}.max_abs"]
        if diff > tol:  # nothing is written: atomic_dir drops the temporary folder
            raise UserError(
                f"export: {name} output differs from PyTorch by {diff:.3g} "
                f"(export.parity_tol is {tol:g}); the exported model is not trustworthy"
            )
    return out


def run(params: Params, paths: StagePaths, tracker) -> dict:
    """Export, check parity, quantise (export.int8), time, write the model card."""
    ep, student_path = params.export, paths.student / "student.pth"
    model = load_student(student_path)
    metrics: dict = {
        "opset": ep.opset,
        "params": count_params(model),
        "gmacs_1080p": round(conv_macs(model, *FRAME_1080P) / 1e9, 3),
    }
    with atomic_dir(paths.export) as tmp:
        files = {"student.onnx": export_onnx(model, tmp / "student.onnx", ep.opset)}
        if ep.fp16:
            files["student_fp16.onnx"] = export_onnx(model, tmp / "student_fp16.onnx", ep.opset, fp16=True)
        files["student.pt"] = export_torchscript(model, tmp / "student.pt")
        metrics |= check_files(model, files, paths, ep.parity_tol)
        if ep.int8:
            files["student_int8.onnx"] = tmp / "student_int8.onnx"
            metrics |= export_int8(params, paths.pairs, files["student.onnx"], files["student_int8.onnx"])
        onnx, ts, fp16, int8 = (
            files.get(f) for f in ("student.onnx", "student.pt", "student_fp16.onnx", "student_int8.onnx")
        )
        metrics |= measure_speed(model, onnx, ts, fp16, ep.speed_repeats, int8)
        card, md = model_card(
            model,
            params,
            files,
            metrics,
            teacher_dir=paths.teacher,
            manifest=paths.raw / "manifest.csv",
            eval_path=paths.metrics / "eval.json",
            student_json=student_path.parent / "student.json",
        )
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (tmp / "model_card.md").write_text(md)
    write_json(paths.metrics / "export.json", metrics)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    tracker.log_metrics({f"export.{k}": float(v) for k, v in numeric.items()})
    tracker.log_artifact(paths.export / "model_card.md")
    example = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    # Registered for `sharpkd sharpen --model models:/...` and `mlflow models serve` (sharpkd.deploy.serving).
    tiling = (params.infer.tile, params.infer.overlap)
    tracker.log_onnx_model(paths.export / "student.onnx", example, tiling=tiling)
    return metrics


if __name__ == "__main__":
    run_stage("export", run)
