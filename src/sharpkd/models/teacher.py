"""Obtaining and loading the teacher: pretrained SwinIR-M, PAN, any spandrel checkpoint, or our EDSR.

`models/teacher/` holds `teacher.pth` and `teacher.json`; `load_teacher` turns that
folder back into a module mapping LR (B,3,h,w) in [0,1] to SR (B,3,h*s,w*s).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from sharpkd.errors import UserError
from sharpkd.models.edsr import EDSR
from sharpkd.models.student import count_params
from sharpkd.weights import sha256_of

# Deep features before the upsampler, on the LR grid, per architecture.
DEFAULT_FEATURE_LAYERS = {
    "EDSR-sharpkd": ("body",),
    "SwinIR": ("conv_after_body",),
    "HAT": ("conv_after_body",),
    "PAN": None,  # filled from models/pan.py
}


def load_spandrel(path: str | Path, scale: int | None = None) -> tuple[nn.Module, str, int]:
    """(module, architecture name, scale) of any SR checkpoint spandrel knows; strict loading."""
    from spandrel import ModelLoader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher checkpoint {path} not found")
    try:
        desc = ModelLoader().load_from_file(str(path))
    except Exception as exc:  # spandrel raises plain exceptions for unknown or broken files
        raise UserError(f"teacher checkpoint {path}: spandrel cannot load it ({exc})") from None
    if scale is not None and desc.scale != scale:
        raise UserError(
            f"teacher checkpoint {path} is a x{desc.scale} model but data.scale is {scale}; use a x{scale} checkpoint"
        )
    return desc.model, desc.architecture.name, desc.scale


def _pan_module():
    from sharpkd.models import pan

    return pan


def load_teacher(
    folder: str | Path = "models/teacher", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """The teacher saved by the `teacher` stage, in eval mode, and its teacher.json."""
    import json

    folder = Path(folder)
    info_path, weights = folder / "teacher.json", folder / "teacher.pth"
    if not info_path.is_file() or not weights.is_file():
        raise UserError(
            f"{folder}: no teacher found (expected teacher.json and teacher.pth; run `dvc repro teacher`)"
        )
    info = json.loads(info_path.read_text())
    loader = info["loader"]
    if loader == "spandrel":
        model, _, _ = load_spandrel(weights, info["scale"])
    elif loader == "pan":
        pan = _pan_module()
        model = pan.PAN(scale=info["scale"])
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    elif loader == "edsr":
        model = EDSR(**info["arch"])
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    else:
        raise UserError(f"{info_path}: unknown teacher loader {loader!r}")
    return model.to(device).eval(), info


def default_feature_layers(architecture: str) -> tuple[str, ...]:
    if architecture == "PAN":
        return tuple(_pan_module().DEFAULT_FEATURE_LAYERS)
    return tuple(DEFAULT_FEATURE_LAYERS.get(architecture) or ())


def describe(
    model: nn.Module,
    *,
    source: str,
    loader: str,
    architecture: str,
    scale: int,
    weights: Path,
    feature_layers,
    **extra,
) -> dict:
    names = dict(model.named_modules())
    layers = tuple(feature_layers) or default_feature_layers(architecture)
    missing = [n for n in layers if n not in names]
    if missing:
        raise UserError(
            f"teacher.feature_layers: {missing} not found in the {architecture} teacher; "
            f"some module names: {', '.join(list(names)[1:12])} ..."
        )
    return {
        "source": source,
        "loader": loader,
        "architecture": architecture,
        "scale": scale,
        "params": count_params(model),
        "sha256": sha256_of(weights),
        "feature_layers": list(layers),
        **extra,
    }


def copy_weights(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
