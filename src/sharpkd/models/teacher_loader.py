"""Loading and describing the teacher: pretrained SwinIR-M, PAN, any spandrel checkpoint, or our EDSR.

`models/teacher/` holds `teacher.pth` and `teacher.json` (`describe`) of the named teacher
(teacher.source), and, for an ensemble (teacher.ensemble), `members/<source>/` of each further teacher,
saved the same way (`save_teacher`); `load_teacher` turns that folder back into a module mapping LR
(B,3,h,w) in [0,1] to SR (B,3,h*s,w*s): the named teacher alone, or the `TeacherEnsemble` of it and
its members (and the 8-fold self-ensemble, teacher.self_ensemble). Obtaining a teacher (downloading,
training) is sharpkd/teachers.py's table, which the teacher stage alone imports.
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
from sharpkd.files import write_json
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
    "DCTLSA": ("LR_conv",),  # 55 channels, the conv closing the body before the upsampler
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


MEMBERS = "members"  # models/teacher/members/<source>/: an ensemble's further teachers

# The 8 symmetries of the square, as (quarter turns, mirrored). The plain pass comes last: forward
# hooks on the named teacher's modules (the feature tap) so end holding its features of the input itself.
DIHEDRAL = tuple((k, flip) for flip in (True, False) for k in (3, 2, 1, 0))


def _turn(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    return (x.flip(-1) if flip else x).rot90(k, (-2, -1))


def _turn_back(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    y = y.rot90(-k, (-2, -1))
    return y.flip(-1) if flip else y


class TeacherEnsemble(nn.Module):
    """The mean output of teachers of one scale (equal weights), each run on the 8 flips/rotations of the
    input when `self_ensemble` (each output turned back). members[0] is the named teacher
    (teacher.source), the one whose features are distilled (`named_teacher`)."""

    def __init__(self, members: list[nn.Module], self_ensemble: bool):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.transforms = DIHEDRAL if self_ensemble else ((0, False),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=x.device)
        for member in self.members:
            for k, flip in self.transforms:
                # Each member's image is its output clipped to [0, 1] (what the cache stores of a lone
                # teacher): an overshoot of one must not pull the others' mean past it.
                total = total + _turn_back(member(_turn(x, k, flip)), k, flip).float().clamp(0, 1)
        return total / (len(self.members) * len(self.transforms))


def named_teacher(model: nn.Module) -> nn.Module:
    """The teacher teacher.source names: the one feature KD taps (teacher.feature_layers are its modules)."""
    return model.members[0] if isinstance(model, TeacherEnsemble) else model


def _load_one(folder: Path) -> tuple[nn.Module, dict]:
    info_path, weights = folder / "teacher.json", folder / "teacher.pth"
    if not info_path.is_file() or not weights.is_file():
        raise UserError(
            f"{folder}: no teacher found (expected teacher.json and teacher.pth; run `dvc repro teacher`)"
        )
    info = json.loads(info_path.read_text())
    if info.get("loader") not in TEACHER_LOADERS:
        raise UserError(f"{info_path}: unknown teacher loader {info.get('loader')!r}")
    return TEACHER_LOADERS[info["loader"]](weights, info), info


def member_folder(folder: Path, source: str) -> Path:
    if not source or Path(source).name != source or source in (".", ".."):
        raise UserError(f"{folder / 'teacher.json'}: bad ensemble member {source!r} (a source name)")
    return folder / MEMBERS / source


def load_teacher(
    folder: str | Path = "models/teacher", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """The teacher saved by the `teacher` stage, in eval mode, and its teacher.json: the named teacher,
    or the TeacherEnsemble of it and its members when teacher.json records any or the self-ensemble."""
    folder = Path(folder)
    model, info = _load_one(folder)
    members = [_load_one(member_folder(folder, m["source"]))[0] for m in info.get("members", [])]
    if members or info.get("self_ensemble"):
        model = TeacherEnsemble([model, *members], bool(info.get("self_ensemble")))
    return model.to(device).eval(), info


def teacher_name(info: dict) -> str:
    """What the reports call the teacher: its architecture, e.g. "DCTLSA + PAN (x8 self-ensemble)"."""
    archs = [info["architecture"], *(m["architecture"] for m in info.get("members", []))]
    return " + ".join(archs) + (" (x8 self-ensemble)" if info.get("self_ensemble") else "")


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


def save_teacher(
    folder: Path,
    model: nn.Module,
    weights_file: Path | None,
    fields: dict,
    *,
    source: str,
    scale: int,
    feature_layers=(),
    members: list[dict] = (),
    self_ensemble: bool = False,
) -> dict:
    """teacher.pth and teacher.json of one teacher in `folder`; returns teacher.json. `weights_file` (a
    source's own file) is kept byte for byte, so its sha256 stays the published one; None: the state
    dict. `members`: the teacher.json of each further teacher, saved first in member_folder(folder, source)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / "teacher.pth"
    if weights_file is not None:
        shutil.copyfile(weights_file, dest)
    else:
        torch.save(model.state_dict(), dest)
    info = describe(model, source=source, scale=scale, weights=dest, feature_layers=feature_layers, **fields)
    keep = ("source", "architecture", "params", "sha256", "origin")
    info |= {
        "self_ensemble": self_ensemble,
        "members": [{k: m[k] for k in keep if k in m} for m in members],
        # What the ensemble costs: each pass of each member (the named teacher's `params` stay its own).
        "total_params": info["params"] + sum(m["params"] for m in members),
        "passes": (1 + len(members)) * (len(DIHEDRAL) if self_ensemble else 1),
    }
    info["name"] = teacher_name(info)
    write_json(folder / "teacher.json", info)
    return info
