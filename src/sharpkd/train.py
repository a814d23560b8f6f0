"""The one training loop, for the student and for a teacher trained from scratch.

`fit` trains an *objective*: an nn.Module whose forward(batch) returns
(total loss, {term: value}). Batches come from `batch_fn(step)`, which must be a
pure function of the step (see data/datasets.py), so a resumed run sees exactly
the batches an uninterrupted run would. AdamW, cosine schedule with linear
warm-up, gradient clipping, an optional exponential moving average of the weights
(validated, kept and saved in their place; the raw weights are validated beside them), bf16 autocast where the device computes bf16
natively (CUDA; CPUs with AVX512-BF16 or AMX), channels-last on CUDA, a
checkpoint every `checkpoint_every` steps, validation every `eval_every` steps.
A checkpoint holds the weights, optimizer, scheduler and RNG states and a
`TrainState` (step, curve, best validation and the weights at it). Under
`torchrun` the objective is wrapped in DistributedDataParallel and only rank 0
validates and writes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from sharpkd.errors import UserError, load_error
from sharpkd.files import atomic_path, remove_stale_temps
from sharpkd.progress import progress
from sharpkd.tensors import default_device

if TYPE_CHECKING:
    from tqdm import tqdm


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops rather than writing garbage."""


@dataclass
class FitConfig:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 0  # 0 = no checkpoints
    amp: bool = True
    seed: int = 0
    log_every: int = 10
    ema_decay: float = 0.0  # 0 = no moving average of the weights
    keep: str = "best"  # best: the weights at the best validation PSNR; last: at the last validation
    # Anything that must match for a checkpoint to be resumed (params, data fingerprint).
    fingerprint: dict = field(default_factory=dict)


@dataclass
class FitResult:
    steps: int
    best_step: int
    best_metrics: dict
    best_state: dict | None
    last_metrics: dict
    curve: list[dict]
    seconds: float
    steps_per_s: float | None  # None when no step ran here: resumed from a finished checkpoint
    resumed_from: int
    precision: str = "fp32"  # of the training forward and backward passes: "bf16" under autocast


def device_for_training() -> torch.device:
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return default_device()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no bf16 autocast on this CPU
        return frozenset()
    return frozenset(w for line in text.splitlines() if line.startswith("flags") for w in line.split())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware. On a CPU without AVX512-BF16 or AMX, oneDNN
    emulates bf16 and is slower than fp32; on one with it, a conv student's training step takes
    0.6x the time (rep 48 x 6, batch 32, one thread of this repo's 2-core EPYC: 115 against 192 ms)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def distributed_setup() -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def lr_at(step: int, cfg: FitConfig) -> float:
    """Linear warm-up, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    """Where training stands: the steps done, the curve so far and the best validation seen.

    Together with the weights, optimizer, scheduler and RNG states it is what a checkpoint holds, so
    that a resumed run carries on exactly where the interrupted one stopped."""

    step: int = 0
    curve: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # metrics at the best validation PSNR
    best_step: int = -1
    best_state: dict | None = None  # the objective's state_dict (on the CPU) at best_step
    ema: dict | None = None  # WeightAverage.state_dict(), when cfg.ema_decay > 0

    def to_checkpoint(
        self,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        cfg: FitConfig,
        fingerprint: dict,
        on_cuda: bool,
    ) -> dict:
        return {
            "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if on_cuda else None,
            "step": self.step,
            "steps": cfg.steps,
            "curve": self.curve,
            "best": self.best,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "ema": self.ema,
            "fingerprint": fingerprint,
            "config": asdict(cfg),
        }

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: dict,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        on_cuda: bool,
    ) -> TrainState:
        """The state saved in `ckpt`, after loading its weights, optimizer, scheduler and RNG states
        into the given ones."""
        objective.load_state_dict(ckpt["objective"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        # Checkpoints written on a CPU have none (None), and a CPU run has no CUDA RNG to set.
        if on_cuda and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        return cls(
            step=ckpt["step"],
            curve=ckpt["curve"],
            best=ckpt["best"],
            best_step=ckpt["best_step"],
            best_state=ckpt["best_state"],
            ema=ckpt.get("ema"),
        )

    def validate(
        self,
        objective: nn.Module,
        evaluate: Callable[[], dict],
        step: int,
        average: WeightAverage | None = None,
        keep_last: bool = False,
    ) -> dict:
        """`evaluate()`'s metrics at `step`; the objective's state is kept when its PSNR is the best yet.
        With a moving `average`, the averaged weights are what is validated and kept; the raw
        weights' metrics come back beside them as `raw_<metric>`. `keep_last`: every validation's state is
        kept (fine-tuning to data with no HR, where the validation images are not the target)."""
        objective.eval()
        with torch.no_grad():
            raw = evaluate() if average is not None else {}
            with average.swapped_in(objective) if average is not None else contextlib.nullcontext():
                metrics = evaluate() | {f"raw_{k}": v for k, v in raw.items()}
                better = metrics.get("psnr", -math.inf) > (self.best or {}).get("psnr", -math.inf)
                if keep_last or not self.best or better:
                    self.best, self.best_step = dict(metrics), step
                    self.best_state = {
                        k: v.detach().to("cpu", copy=True) for k, v in objective.state_dict().items()
                    }
        objective.train()
        return metrics


class WeightAverage:
    """An exponential moving average of a module's floating-point state (weights and buffers).

    The decay ramps up as (1 + n) / (10 + n) over the first updates (capped at `decay`), so the
    average is not anchored to the initial weights."""

    def __init__(self, module: nn.Module, decay: float, state: dict | None = None):
        self.decay = decay
        self.names = [k for k, v in module.state_dict().items() if v.is_floating_point()]
        current = module.state_dict()
        self.updates = int(state["updates"]) if state else 0
        source = state["weights"] if state else current
        self.weights = [source[k].detach().to(current[k].device, copy=True) for k in self.names]

    def update(self, module: nn.Module) -> None:
        current = module.state_dict()
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.weights, [current[k].detach() for k in self.names], 1 - decay)

    def state_dict(self) -> dict:
        return {
            "updates": self.updates,
            "weights": {k: v.to("cpu", copy=True) for k, v in zip(self.names, self.weights, strict=True)},
        }

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """`module` holds the averaged weights inside the block, its own ones again after it."""
        saved = {k: v.detach().clone() for k, v in module.state_dict().items() if k in set(self.names)}
        module.load_state_dict(dict(zip(self.names, self.weights, strict=True)), strict=False)
        try:
            yield module
        finally:
            module.load_state_dict(saved, strict=False)


def fit(
    objective: nn.Module,
    batch_fn: Callable[[int], dict[str, torch.Tensor]],
    cfg: FitConfig,
    *,
    evaluate: Callable[[], dict] | None = None,
    checkpoint_path: str | Path | None = None,
    log_metrics: Callable[[dict, int], None] | None = None,
    desc: str = "train",
) -> FitResult:
    """Train `objective` for cfg.steps; validate with `evaluate()` (returns {'psnr': ...}).

    The result carries the objective's state at the best validation PSNR (`best_state`)
    and at the end (the objective itself); both survive a resume through the checkpoint.
    """
    rank, world = distributed_setup()
    device = device_for_training()
    torch.manual_seed(cfg.seed)
    objective.to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        objective.to(memory_format=torch.channels_last)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)
    # Only the training passes: validation and everything saved stay in fp32.
    precision = "bf16" if cfg.amp and native_bf16(device) else "fp32"
    # The precision is part of what a checkpoint must match: a run is resumed only in the arithmetic
    # it began in (fp32 checkpoints from before CPU bf16 training existed train again).
    fingerprint = _jsonable({**cfg.fingerprint, "precision": precision})
    ckpt_path = Path(checkpoint_path) if checkpoint_path else None
    state = _resume(
        ckpt_path,
        objective,
        optimizer,
        scheduler,
        cfg=cfg,
        fingerprint=fingerprint,
        on_cuda=on_cuda,
        rank=rank,
        desc=desc,
    )
    start = state.step
    average = WeightAverage(objective, cfg.ema_decay, state.ema) if cfg.ema_decay > 0 else None

    # Wrapped after the resume: DDP broadcasts rank 0's (resumed) weights to the other ranks.
    model = objective
    if world > 1:
        model = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if on_cuda else None)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    train_step = functools.partial(
        _train_step,
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        grad_clip=cfg.grad_clip,
        device=device,
        autocast=autocast,
    )

    objective.train()
    t0, last_metrics = time.perf_counter(), {}
    bar = progress(
        range(start, cfg.steps),
        desc=desc,
        unit="step",
        disable=rank != 0,
        initial=start,
        total=cfg.steps,
        mininterval=1.0,
    )
    for step in bar:
        total, terms = train_step(batch_fn(step), step)
        if average is not None:
            average.update(objective)
        done = step + 1
        row = {
            "step": done,
            "loss": total.item(),
            **{k: float(v) for k, v in terms.items()},
            "lr": scheduler.get_last_lr()[0],
        }
        # Only rank 0 validates and writes; the other ranks train in step with it.
        if evaluate is not None and rank == 0 and _due(done, cfg.eval_every, cfg.steps):
            last_metrics = state.validate(objective, evaluate, done, average, cfg.keep == "last")
            row.update({f"val_{k}": v for k, v in last_metrics.items()})
        state.step = done
        state.curve.append(row)
        if rank == 0:
            _report(bar, row, cfg, log_metrics)
        # checkpoint_every 0: no checkpoint at all, not even after the last step.
        if cfg.checkpoint_every and _due(done, cfg.checkpoint_every, cfg.steps) and rank == 0 and ckpt_path:
            state.ema = average.state_dict() if average is not None else None
            ckpt = state.to_checkpoint(
                objective, optimizer, scheduler, cfg=cfg, fingerprint=fingerprint, on_cuda=on_cuda
            )
            with atomic_path(ckpt_path) as tmp:
                torch.save(ckpt, tmp)

    seconds = time.perf_counter() - t0
    ran = cfg.steps - start
    if world > 1:
        dist.barrier()
    return FitResult(
        steps=cfg.steps,
        best_step=state.best_step,
        best_metrics=state.best,
        best_state=state.best_state,
        last_metrics=last_metrics,
        curve=state.curve,
        seconds=seconds,
        steps_per_s=ran / seconds if ran > 0 and seconds > 0 else None,
        resumed_from=start,
        precision=precision,
    )


def _resume(
    ckpt_path: Path | None,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    cfg: FitConfig,
    fingerprint: dict,
    on_cuda: bool,
    rank: int,
    desc: str,
) -> TrainState:
    """The state to start from: that of the checkpoint at `ckpt_path` (loaded into the objective,
    optimizer, scheduler and RNGs) when it is from this configuration, else a fresh one at step 0."""
    if ckpt_path is None:
        return TrainState()
    if rank == 0:
        remove_stale_temps(ckpt_path.parent)  # a checkpoint half-written when a run was killed
    ckpt = _read_checkpoint(ckpt_path, desc, rank) if ckpt_path.is_file() else None
    if ckpt is None:
        return TrainState()
    if ckpt.get("fingerprint") != fingerprint or ckpt.get("steps") != cfg.steps:
        if rank == 0:
            print(f"[{desc}] {ckpt_path} is from a different configuration; starting from step 0")
        return TrainState()
    state = TrainState.from_checkpoint(ckpt, objective, optimizer, scheduler, on_cuda=on_cuda)
    if rank == 0:
        print(f"[{desc}] resuming from {ckpt_path} at step {state.step}/{cfg.steps}")
    return state


def _train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[nn.Parameter],
    grad_clip: float,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step on `batch`: the loss and its terms, as the forward pass returned them."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if device.type == "cuda":
        # The layout fit put the weights in: convs run fastest with both channels-last.
        batch = {
            k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
            for k, v in batch.items()
        }
    with autocast:
        total, terms = model(batch)
    if not torch.isfinite(total):
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({shown}); no weights were written. "
            "Lower distill.lr (or teacher.train.lr), or check the inputs."
        )
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    scheduler.step()
    return total, terms


def _due(done: int, every: int, steps: int) -> bool:
    """Whether step `done` is one for a thing done every `every` steps (0: none) and after the last."""
    return bool(every and done % every == 0) or done == steps


def _report(bar: tqdm, row: dict, cfg: FitConfig, log_metrics: Callable[[dict, int], None] | None) -> None:
    """Show a step's loss (and validation PSNR) on the bar; log it every cfg.log_every steps, at each
    validation and at the end."""
    val = {"val_psnr": f"{row['val_psnr']:.2f}"} if "val_psnr" in row else {}
    # refresh=False: shown at the bar's next (rate-limited) redraw, not as a line per step.
    bar.set_postfix(loss=f"{row['loss']:.4f}", **val, refresh=False)
    done = row["step"]
    if log_metrics and (done % cfg.log_every == 0 or "val_psnr" in row or done == cfg.steps):
        log_metrics({k: v for k, v in row.items() if k != "step"}, done)


def interval_curve(curve: list[dict]) -> list[dict]:
    """One row per validation of a per-step `curve` (FitResult.curve): its step, the loss and each of its terms
    averaged over the steps since the previous validation (one step's loss is mostly its batch's noise), the
    learning rate then, and the validation figures (val_*). No empty cells: a plot draws only measured points."""
    rows, since = [], []
    for row in curve:
        since.append(row)
        val = {k: v for k, v in row.items() if k.startswith("val_")}
        if not val:
            continue
        terms = [k for k in row if k not in ("step", "lr") and k not in val]
        mean = {k: sum(vs) / len(vs) for k in terms if (vs := [r[k] for r in since if k in r])}
        rows.append({"step": row["step"], **mean, "lr": row["lr"], **val})
        since = []
    return rows


def write_curves(curve: list[dict], interval_path: Path, steps_path: Path) -> None:
    """A fit's curve as two tab-separated files: `interval_curve(curve)` (what DVC plots) and every step's loss
    terms and learning rate, without the validation columns (empty on most steps)."""
    import pandas as pd

    steps = [{k: v for k, v in row.items() if not k.startswith("val_")} for row in curve]
    for path, rows in ((interval_path, interval_curve(curve)), (steps_path, steps)):
        with atomic_path(path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False, float_format="%.6g")


NO_STEPS_RAN = "no step ran: resumed from a finished checkpoint (delete it to train again)"


def speed_fields(result: FitResult, digits: int) -> dict:
    """steps_per_s for a metrics file (the measured figure, or null with the reason when no step
    ran) and the precision the steps ran in, which sets it."""
    if result.steps_per_s is None:
        return {"steps_per_s": None, "steps_per_s_reason": NO_STEPS_RAN, "precision": result.precision}
    return {"steps_per_s": round(result.steps_per_s, digits), "precision": result.precision}


def _read_checkpoint(path: Path, desc: str, rank: int) -> dict | None:
    """The resume state saved in `path`, or None: a corrupt or foreign file is set aside (renamed
    `*.unreadable`, with a warning naming it) and training starts from step 0."""
    try:
        # weights_only: tensors and plain containers only; a crafted pickle placed here runs nothing.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"a {type(ckpt).__name__}, not a training checkpoint")
        return ckpt
    except Exception as exc:
        if rank == 0 and path.is_file():
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            print(
                f"[{desc}] warning: {path} cannot be resumed ({load_error(exc)}); "
                f"moved to {aside}, training starts from step 0",
                file=sys.stderr,
            )
        return None


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, sort_keys=True, default=str))
