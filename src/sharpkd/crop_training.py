"""Training on random crops of data/pairs, validated on the validation images.

The student's distillation (distill.py) and the teacher trained from scratch (teachers.py) both run
`train.fit` this way: its settings from their params group (distill, teacher.train); validation
through `metrics.validate` (the one tiled inference path, PSNR and SSIM on the Y channel; no LPIPS,
which would slow every evaluation and needs weights); the per-step metrics logged to the stage's
tracker under a prefix of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sharpkd.config import DistillParams, Params, TeacherTrainParams
from sharpkd.metrics import QualityMetrics, validate
from sharpkd.train import FitConfig, FitResult, fit


def loop_config(group: DistillParams | TeacherTrainParams, params: Params, **more) -> FitConfig:
    """train.fit's settings from a params group holding the loop's keys (steps, lr, warmup_steps,
    grad_clip, eval_every); `more`: what only one caller sets (weight decay, checkpoints, fingerprint)."""
    return FitConfig(
        steps=group.steps,
        lr=group.lr,
        warmup_steps=group.warmup_steps,
        grad_clip=group.grad_clip,
        eval_every=group.eval_every,
        amp=params.compute.amp,
        seed=params.seed,
        **more,
    )


def fit_on_crops(
    objective: nn.Module,
    batch_fn: Callable[[int], dict[str, torch.Tensor]],
    cfg: FitConfig,
    *,
    model: nn.Module,
    valid: list,
    params: Params,
    use: str,
    scale_out: int,
    align: int = 1,
    tracker,
    log_prefix: str,
    desc: str,
    checkpoint_path: Path | None = None,
) -> FitResult:
    """`fit(objective, batch_fn, cfg)`, validating `model` (the network inside `objective`) on `valid`.

    `use` is the input `model` is run on ('lr' for a teacher, 'input' for the student), `scale_out`
    its output size over that input's, `align` the side its input must be a multiple of. `valid` is
    empty on a torchrun rank that does not validate. Metrics go to `tracker` as `<log_prefix><term>`.
    """
    metrics = QualityMetrics(params.data.scale, lpips=False)
    return fit(
        objective,
        batch_fn,
        cfg,
        evaluate=lambda: validate(
            model,
            valid,
            metrics,
            use=use,
            scale_out=scale_out,
            tile=params.infer.tile,
            overlap=params.infer.overlap,
            align=align,
        ),
        checkpoint_path=checkpoint_path,
        log_metrics=lambda m, step: tracker.log_metrics(
            {f"{log_prefix}{k}": v for k, v in m.items()}, step=step
        ),
        desc=desc,
    )
