"""The `teacher` stage: obtain the teacher named by teacher.source and write models/teacher/."""

from __future__ import annotations

from pathlib import Path

import torch

from sharpkd.config import Params
from sharpkd.data.datasets import TrainPatches, load_valid
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir, write_json
from sharpkd.models import teacher as T
from sharpkd.models.edsr import EDSR


def build_teacher(params: Params, tracker, pairs_dir="data/pairs", out_dir="models/teacher") -> dict:
    scale, source = params.data.scale, params.teacher.source
    with atomic_dir(out_dir) as tmp:
        dest = tmp / "teacher.pth"
        if source in ("swinir", "checkpoint"):
            if source == "swinir":
                from sharpkd import weights

                spec = weights.PRETRAINED[f"swinir_x{scale}"]
                path = weights.fetch_weights(
                    spec["filename"], spec["url"], spec["sha256"], weights.weights_dir(params.weights.dir)
                )
            else:
                path = Path(params.teacher.checkpoint)
            model, arch, _ = T.load_spandrel(path, scale)
            T.copy_weights(path, dest)
            info = T.describe(
                model,
                source=source,
                loader="spandrel",
                architecture=arch,
                scale=scale,
                weights=dest,
                feature_layers=params.teacher.feature_layers,
                origin=str(path),
            )
        elif source == "pan":
            from sharpkd import weights
            from sharpkd.models.pan import PAN

            spec = weights.PRETRAINED[f"pan_x{scale}"]
            path = weights.fetch_weights(
                spec["filename"], spec["url"], spec["sha256"], weights.weights_dir(params.weights.dir)
            )
            model = PAN(scale=scale)
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            except RuntimeError as exc:
                raise UserError(
                    f"{path}: not a PAN x{scale} state dict ({str(exc).splitlines()[0]})"
                ) from None
            T.copy_weights(path, dest)
            info = T.describe(
                model,
                source=source,
                loader="pan",
                architecture="PAN",
                scale=scale,
                weights=dest,
                feature_layers=params.teacher.feature_layers,
                origin=spec["url"],
            )
        else:
            model, result = train_teacher(params, tracker, pairs_dir)
            torch.save(model.state_dict(), dest)
            info = T.describe(
                model,
                source=source,
                loader="edsr",
                architecture="EDSR-sharpkd",
                scale=scale,
                weights=dest,
                feature_layers=params.teacher.feature_layers,
                arch=model.arch_kwargs(),
                train={
                    "steps": result.steps,
                    "seconds": round(result.seconds, 1),
                    "steps_per_s": round(result.steps_per_s, 2),
                    "best_step": result.best_step,
                    "val": result.best_metrics,
                },
            )
        write_json(tmp / "teacher.json", info)
    print(f"[teacher] {info['architecture']} x{scale} from {source}: {info['params']:,} params -> {out_dir}")
    tracker.log_metrics({"teacher.params": info["params"]})
    tracker.set_tags({"teacher.architecture": info["architecture"]})
    return info


def train_teacher(params: Params, tracker, pairs_dir="data/pairs"):
    """EDSR from scratch on the LR->HR training pairs, through the one training loop."""
    from sharpkd.evaluation import validate
    from sharpkd.losses import SuperResolutionObjective
    from sharpkd.metrics import QualityMetrics
    from sharpkd.train import FitConfig, distributed_setup, fit

    tp = params.teacher.train
    torch.manual_seed(params.seed)
    model = EDSR(scale=params.data.scale, channels=tp.channels, blocks=tp.blocks)
    rank, world = distributed_setup()
    patches = TrainPatches(pairs_dir, keys=("hr", "lr"))
    valid = load_valid(pairs_dir)
    metrics = QualityMetrics(params.data.scale, lpips=False)
    cfg = FitConfig(
        steps=tp.steps,
        lr=tp.lr,
        warmup_steps=min(30, tp.steps // 10),
        grad_clip=1.0,
        eval_every=max(1, tp.steps // 4),
        amp=params.distill.amp,
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
    return model.cpu().eval(), result
