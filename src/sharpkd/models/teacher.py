"""Loading and describing the teacher: pretrained SwinIR-M, PAN, any spandrel checkpoint, or our EDSR.

`models/teacher/` holds `teacher.pth` and `teacher.json` (`describe`); `load_teacher` turns that
folder back into a module mapping LR (B,3,h,w) in [0,1] to SR (B,3,h*s,w*s). Obtaining a teacher
(downloading, training) is sharpkd/teachers.py's table, which the teacher stage alone imports.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sharpkd.errors import UserError, load_error
from sharpkd.fetch import file_digest
from sharpkd.models import count_params
from sharpkd.models.edsr import EDSR
from sharpkd.models.pan import DEFAULT_FEATURE_LAYERS as PAN_FEATURE_LAYERS
from sharpkd.models.pan import PAN

# Deep features before the upsampler, on the LR grid, per architecture.
DEFAULT_FEATURE_LAYERS = {
    "EDSR-sharpkd": ("body",),
    "SwinIR": ("conv_after_body",),
    "HAT": ("conv_after_body",),
    "PAN": PAN_FEATURE_LAYERS,
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


def load_state_dict_file(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    """`model` with the state dict in `path`, loaded strictly and safely (tensors only, no code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # a wrong, truncated or code-carrying file
        raise UserError(f"{path}: not a {what} state dict ({load_error(exc)})") from None
    return model


# teacher.json's "loader" -> how its teacher.pth becomes a module.
TEACHER_LOADERS: dict[str, Callable[[Path, dict], nn.Module]] = {
    "spandrel": lambda path, info: load_spandrel(path, info["scale"])[0],
    "pan": lambda path, info: load_state_dict_file(PAN(scale=info["scale"]), path, f"PAN x{info['scale']}"),
    "edsr": lambda path, info: load_state_dict_file(EDSR(**info["arch"]), path, "EDSR-sharpkd"),
}


def load_teacher(
    folder: str | Path = "models/teacher", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """The teacher saved by the `teacher` stage, in eval mode, and its teacher.json."""
    folder = Path(folder)
    info_path, weights = folder / "teacher.json", folder / "teacher.pth"
    if not info_path.is_file() or not weights.is_file():
        raise UserError(
            f"{folder}: no teacher found (expected teacher.json and teacher.pth; run `dvc repro teacher`)"
        )
    info = json.loads(info_path.read_text())
    if info.get("loader") not in TEACHER_LOADERS:
        raise UserError(f"{info_path}: unknown teacher loader {info.get('loader')!r}")
    return TEACHER_LOADERS[info["loader"]](weights, info).to(device).eval(), info


def default_feature_layers(architecture: str) -> tuple[str, ...]:
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
    """teacher.json for `model` saved as `weights`; the feature layers (teacher.feature_layers, or the
    architecture's default) must name modules of it, since cache_teacher hooks them."""
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
        "sha256": file_digest(weights),
        "feature_layers": list(layers),
        **extra,
    }


def copy_weights(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
