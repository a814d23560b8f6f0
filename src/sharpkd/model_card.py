"""The model card of an exported student (models/export/model_card.json and .md): what it is, what made it,
how good and how fast it is (from metrics/eval.json and the export's own figures), and its limits."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from sharpkd import __version__
from sharpkd.config import PIPELINE_GROUPS, Params, flatten
from sharpkd.deploy.images import printable
from sharpkd.deploy.timing import FRAME_1080P
from sharpkd.fetch import file_digest
from sharpkd.models import count_params
from sharpkd.models.student import Student, conv_macs


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


def demo_note(params: Params, data: dict) -> str | None:
    """What a student of the quick profile (data.source samples) is: a demo of the pipeline on a handful of
    photos, not what its architecture reaches. None for any other data."""
    if params.data.source != "samples":
        return None
    images = data.get("images")
    photos = f"{images['train']} " if isinstance(images, dict) and "train" in images else ""
    init = f", fine-tuned from {params.student.init}" if params.student.init else ""
    return (
        f"Demo model: trained on {photos}scikit-image sample photos (data.source samples, the quick "
        f"profile's data) for {params.distill.steps:,} steps{init}. It shows the pipeline runs, not what "
        "this architecture reaches: see the zoo students (sharpkd zoo) and docs/results.md."
    )


def int8_costs(metrics: dict) -> dict[str, dict]:
    """{set: {psnr_fp32, psnr_int8, psnr_cost, ssim_cost}} from export.json's `int8.<set>.<metric>_<kind>` keys
    (quantize.int8_cost); {} when no INT8 model was scored."""
    costs: dict[str, dict] = {}
    for key, value in metrics.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "int8" and parts[2].startswith(("psnr_", "ssim_")):
            costs.setdefault(parts[1], {})[parts[2]] = value
    return {name: c for name, c in costs.items() if "psnr_cost" in c}


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


# Markdown's active characters, written as text by a backslash: `\` ` * |, `_` where it could open or close
# emphasis (not inside a word: `patch_size` stays as it is), and `]` before `(`, which would close a link or
# an image (a list such as [70, 95] stays as it is: the card defines no reference links).
_MD_ACTIVE = re.compile(r"[\\`*|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\](?=\()")


def md_text(value) -> str:
    """`value` as markdown text that renders as itself on one line: control characters escaped (a newline
    starts no heading or row), `<`, `>`, `&` as HTML entities (no live tag), the rest backslash-escaped
    (`|` splits no table cell)."""
    text = html.escape(printable(str(value)), quote=False)
    return _MD_ACTIVE.sub(lambda m: "\\" + m.group(0), text)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.6g}"
        return md_text(v)

    lines = ["| " + " | ".join(map(md_text, header)) + " |", "|" + "---|" * len(header)]
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


def _speed_rows(speed: dict) -> list[list]:
    """One row per figure of the timing.speed_figures keys (speed.<model>.<runtime>.<size>.ms / fps / reason)."""
    figures = dict.fromkeys(k.rsplit(".", 1)[0] for k in speed if k.count(".") == 4)
    return [
        [*f.split(".")[1:3], speed.get(f"{f}.ms"), speed.get(f"{f}.fps"), speed.get(f"{f}.reason", "")]
        for f in figures
    ]


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
        "io": "input (N,3,H,W) RGB, output the same shape: float32 in [0,1] for student.onnx, float16 for "
        "student_fp16.onnx, uint8 (0-255) in and out for student_int8.onnx",
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
        "timing": {k: v for k, v in metrics.items() if k.startswith("timing.")},
        "speed": {k: v for k, v in metrics.items() if k.startswith("speed.")},
        "int8": {k: v for k, v in metrics.items() if k.startswith("int8.")},
        "int8_cost": int8_costs(metrics),
        "demo": demo_note(params, data),
        "intended_use": INTENDED_USE.format(scale=arch["scale"]),
        "limits": LIMITS,
    }
    md = [
        f"# sharpkd student (x{arch['scale']}, {arch['channels']} channels, {arch['blocks']} blocks)",
        "",
        *([f"**{md_text(card['demo'])}**", ""] if card["demo"] else []),
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
        md.append(md_text(f"unknown ({teacher_dir / 'teacher.json'} not found)"))
    md += [
        "",
        "## Data",
        "",
        _table(["item", "value"], [[k, v] for k, v in data.items() if k != "degradation"]),
        "",
        "Degradation: " + md_text(", ".join(f"{k}={v}" for k, v in data["degradation"].items())) + ".",
    ]
    md += [
        "",
        "## Evaluation",
        "",
        _eval_table(evaluation) if evaluation else md_text(f"not available ({eval_path} not found)"),
    ]
    if card["int8_cost"]:
        md += [
            "",
            "## INT8 quality cost (student_int8.onnx against student.onnx, same images and tiling)",
            "",
            _table(
                ["set", "PSNR float32", "PSNR INT8", "PSNR cost (dB)", "SSIM cost"],
                [
                    [name, c.get("psnr_fp32"), c.get("psnr_int8"), c.get("psnr_cost"), c.get("ssim_cost")]
                    for name, c in card["int8_cost"].items()
                ],
            ),
        ]
    md += [
        "",
        "## Parity with PyTorch (max abs difference, CPU)",
        "",
        _table(["check", "value"], [[k.removeprefix("parity."), v] for k, v in card["parity"].items()]),
    ]
    timing = card["timing"]
    md += [
        "",
        "## Speed (one 1080p frame, "
        + md_text(
            f"median of {timing.get('timing.repeats')}, torch threads {timing.get('timing.torch_threads')}, "
            f"{timing.get('timing.device')}"
        )
        + ")",
        "",
        _table(["model", "runtime", "ms per frame", "frames/s", "note"], _speed_rows(card["speed"])),
    ]
    md += [
        "",
        "## Params that produced it",
        "",
        _table(["param", "value"], [[k, v] for k, v in card["params_used"].items()]),
        "",
    ]
    return card, "\n".join(md)
