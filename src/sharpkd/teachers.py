"""Obtaining the teacher named by teacher.source: the one table of teacher sources.

swinir      the official SwinIR-M weights (fetch.PRETRAINED), loaded by spandrel
checkpoint  any SR checkpoint spandrel loads (teacher.checkpoint)
pan         the official PAN weights, our PAN architecture (models/pan.py)
dctlsa      the official DCTLSA weights (a lightweight local self-attention model), loaded by spandrel
train       an EDSR-style CNN trained from scratch on data/pairs through the one training loop

teacher.ensemble names further pretrained sources (swinir, pan, dctlsa: config.ENSEMBLE_SOURCES)
whose teachers are averaged with teacher.source's (`obtain_members`).

The teacher stage saves what a source returns as models/teacher/; models/teacher_loader.py loads it back
(its TEACHER_LOADERS table keys on teacher.json's "loader", which each source names). Kept out of
models/ because obtaining a teacher downloads, verifies and trains: models/teacher_loader.py, which the
later stages import, needs none of that code (nor reruns them when it changes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sharpkd.config import Params
from sharpkd.crop_training import fit_on_crops, loop_config
from sharpkd.data.datasets import TrainPatches, load_valid
from sharpkd.fetch import PRETRAINED, fetch_weights, resolve_weights_dir
from sharpkd.losses import SuperResolutionObjective
from sharpkd.models.edsr import EDSR
from sharpkd.models.pan import PAN
from sharpkd.models.teacher_loader import load_spandrel, load_state_dict_file
from sharpkd.train import distributed_setup, speed_fields


class ObtainedTeacher(NamedTuple):
    model: nn.Module
    # The source's own file, kept byte for byte (its sha256 stays the published one); None: the
    # model was built here and its state dict is what is saved.
    weights_file: Path | None
    fields: dict  # teacher.json fields this source knows: loader, architecture, origin or training


def _pretrained(params: Params, name: str) -> tuple[Path, str]:
    spec = PRETRAINED[f"{name}_x{params.data.scale}"]
    folder = resolve_weights_dir(params.weights.dir)
    return fetch_weights(spec["filename"], spec["url"], spec["sha256"], folder), spec["url"]


def _spandrel(path: Path, params: Params, origin: str) -> ObtainedTeacher:
    model, arch, _ = load_spandrel(path, params.data.scale)
    return ObtainedTeacher(model, path, {"loader": "spandrel", "architecture": arch, "origin": origin})


def _swinir(params: Params, pairs: Path, tracker) -> ObtainedTeacher:
    path, url = _pretrained(params, "swinir")
    return _spandrel(path, params, url)  # the URL: the local copy's path is the account's business


def _checkpoint(params: Params, pairs: Path, tracker) -> ObtainedTeacher:
    path = Path(params.teacher.checkpoint)
    return _spandrel(path, params, str(path))


def _dctlsa(params: Params, pairs: Path, tracker) -> ObtainedTeacher:
    path, url = _pretrained(params, "dctlsa")
    return _spandrel(path, params, url)


def _pan(params: Params, pairs: Path, tracker) -> ObtainedTeacher:
    path, url = _pretrained(params, "pan")
    s = params.data.scale
    model = load_state_dict_file(PAN(scale=s), path, f"PAN x{s}")
    return ObtainedTeacher(model, path, {"loader": "pan", "architecture": "PAN", "origin": url})


def _train(params: Params, pairs: Path, tracker) -> ObtainedTeacher:
    """EDSR from scratch on the LR->HR training pairs, through the one training loop; the best
    validation step's weights are kept."""
    tp = params.teacher.train
    torch.manual_seed(params.seed)
    model = EDSR(scale=params.data.scale, channels=tp.channels, blocks=tp.blocks)
    rank, world = distributed_setup()
    patches = TrainPatches(pairs, keys=("hr", "lr"), patch_size=params.data.patch_size)
    result = fit_on_crops(
        SuperResolutionObjective(model),
        patches.batch_fn(tp.batch_size, params.seed, rank, world),
        loop_config(tp, params),
        model=model,
        valid=load_valid(pairs),
        params=params,
        use="lr",
        scale_out=params.data.scale,
        tracker=tracker,
        log_prefix="teacher_train.",
        desc="teacher",
    )
    if result.best_state is not None:
        model.load_state_dict({k[len("model.") :]: v for k, v in result.best_state.items()})
    train = {
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        **speed_fields(result, 2),
        "best_step": result.best_step,
        "val": result.best_metrics,
    }
    fields = {"loader": "edsr", "architecture": "EDSR-sharpkd", "arch": model.arch_kwargs(), "train": train}
    return ObtainedTeacher(model.cpu().eval(), None, fields)


# teacher.source -> how the teacher is obtained (`pairs`: data/pairs, which only `train` reads).
TEACHER_SOURCES: dict[str, Callable[[Params, Path, object], ObtainedTeacher]] = {
    "swinir": _swinir,
    "checkpoint": _checkpoint,
    "pan": _pan,
    "dctlsa": _dctlsa,
    "train": _train,
}


def obtain_teacher(params: Params, pairs: Path, tracker) -> ObtainedTeacher:
    """The teacher teacher.source names, on the CPU; `tracker` gets a trained teacher's metrics."""
    return TEACHER_SOURCES[params.teacher.source](params, pairs, tracker)


def obtain_members(params: Params, pairs: Path, tracker) -> list[tuple[str, ObtainedTeacher]]:
    """(source, teacher) of each further teacher teacher.ensemble names, on the CPU, at data.scale."""
    return [(source, TEACHER_SOURCES[source](params, pairs, tracker)) for source in params.teacher.ensemble]
