"""DVC stage `teacher`: obtain the teacher named by teacher.source -> models/teacher/ (teacher.pth + teacher.json).

swinir      the official SwinIR-M weights (fetch.PRETRAINED), loaded by spandrel
checkpoint  any SR checkpoint spandrel loads (teacher.checkpoint)
pan         the official PAN weights, our PAN architecture (models/pan.py)
train       an EDSR-style CNN trained from scratch on data/pairs through the one training loop
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sharpkd.config import Params
from sharpkd.data.datasets import TrainPatches, load_valid
from sharpkd.fetch import PRETRAINED, fetch_weights, resolve_weights_dir
from sharpkd.files import atomic_dir, write_json
from sharpkd.losses import SuperResolutionObjective
from sharpkd.metrics import QualityMetrics, validate
from sharpkd.models.edsr import EDSR
from sharpkd.models.pan import PAN
from sharpkd.models.teacher import copy_weights, describe, load_spandrel, load_state_dict_file
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.train import FitConfig, distributed_setup, fit, speed_fields

# Each source returns (model, the weights file to keep or None to save the model's state, teacher.json fields).
Obtained = tuple[nn.Module, Path | None, dict]


def _pretrained(params: Params, name: str) -> tuple[Path, str]:
    spec = PRETRAINED[f"{name}_x{params.data.scale}"]
    folder = resolve_weights_dir(params.weights.dir)
    return fetch_weights(spec["filename"], spec["url"], spec["sha256"], folder), spec["url"]


def _spandrel(path: Path, params: Params, origin: str) -> Obtained:
    model, arch, _ = load_spandrel(path, params.data.scale)
    return model, path, {"loader": "spandrel", "architecture": arch, "origin": origin}


def _swinir(params: Params, paths: StagePaths, tracker) -> Obtained:
    path, url = _pretrained(params, "swinir")
    return _spandrel(path, params, url)  # the URL: the local copy's path is the account's business


def _checkpoint(params: Params, paths: StagePaths, tracker) -> Obtained:
    path = Path(params.teacher.checkpoint)
    return _spandrel(path, params, str(path))


def _pan(params: Params, paths: StagePaths, tracker) -> Obtained:
    path, url = _pretrained(params, "pan")
    s = params.data.scale
    model = load_state_dict_file(PAN(scale=s), path, f"PAN x{s}")
    return model, path, {"loader": "pan", "architecture": "PAN", "origin": url}


def _train(params: Params, paths: StagePaths, tracker) -> Obtained:
    """EDSR from scratch on the LR->HR training pairs, through the one training loop."""
    tp = params.teacher.train
    torch.manual_seed(params.seed)
    model = EDSR(scale=params.data.scale, channels=tp.channels, blocks=tp.blocks)
    rank, world = distributed_setup()
    patches = TrainPatches(paths.pairs, keys=("hr", "lr"), patch_size=params.data.patch_size)
    valid = load_valid(paths.pairs)
    metrics = QualityMetrics(params.data.scale, lpips=False)
    cfg = FitConfig(
        steps=tp.steps,
        lr=tp.lr,
        warmup_steps=tp.warmup_steps,
        grad_clip=tp.grad_clip,
        eval_every=tp.eval_every,
        amp=params.compute.amp,
        seed=params.seed,
    )
    result = fit(
        SuperResolutionObjective(model),
        patches.batch_fn(tp.batch_size, params.seed, rank, world),
        cfg,
        evaluate=lambda: validate(
            model,
            valid,
            metrics,
            use="lr",
            scale_out=params.data.scale,
            tile=params.infer.tile,
            overlap=params.infer.overlap,
        ),
        log_metrics=lambda m, step: tracker.log_metrics(
            {f"teacher_train.{k}": v for k, v in m.items()}, step=step
        ),
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
    return model.cpu().eval(), None, fields


SOURCES = {"swinir": _swinir, "checkpoint": _checkpoint, "pan": _pan, "train": _train}


def run(params: Params, paths: StagePaths, tracker) -> dict:
    scale, source = params.data.scale, params.teacher.source
    model, weights_file, fields = SOURCES[source](params, paths, tracker)
    with atomic_dir(paths.teacher) as tmp:
        dest = tmp / "teacher.pth"
        if weights_file is not None:
            copy_weights(weights_file, dest)
        else:
            torch.save(model.state_dict(), dest)
        info = describe(
            model,
            source=source,
            scale=scale,
            weights=dest,
            feature_layers=params.teacher.feature_layers,
            **fields,
        )
        write_json(tmp / "teacher.json", info)
    print(
        f"[teacher] {info['architecture']} x{scale} from {source}: {info['params']:,} params -> {paths.teacher}"
    )
    tracker.log_metrics({"teacher.params": info["params"]})
    tracker.set_tags({"teacher.architecture": info["architecture"]})
    return info


if __name__ == "__main__":
    run_stage("teacher", run)
