"""Timing targets of torch models (the pipeline's eager student, TorchScript, the teacher) on the deploy
wing's one timing path (deploy/timing.py: frames, keys, medians)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sharpkd.deploy.timing import Target, cpu_name
from sharpkd.tensors import tiled_apply


def device_name(device: str | torch.device) -> str:
    """'cpu: <model name>' or 'cuda: <GPU name>': where a figure was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}"


def downscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """A frame's low-resolution version (antialiased bicubic), for what takes one: the teacher, a resize."""
    return F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True).clamp(0, 1)


def torch_target(
    model: str, runtime: str, module: Callable, device: str, half: bool = False, how: str = "full frame"
) -> Target:
    """A torch module (eager or TorchScript) on `device`: the frame is copied there and its output back."""

    def make(x: np.ndarray):
        dtype = torch.float16 if half else torch.float32
        t = torch.from_numpy(x)

        @torch.no_grad()
        def run():
            return module(t.to(device, dtype)).float().cpu()

        return run

    return Target(model, runtime, str(device), "fp16" if half else "fp32", make, how)


def tiled_target(model: str, module: Callable, scale: int, device: str, tile: int, overlap: int, how: str):
    """A model from the low-resolution image to the frame (the teacher), run tiled as the pipeline runs it;
    it sees the frame downscaled by `scale`. Warmed up on one tile only: a whole extra frame costs a minute
    for SwinIR-M on a CPU."""

    def make(x: np.ndarray):
        lr = downscale(torch.from_numpy(x), scale)
        tiled_apply(module, lr[..., :tile, :tile], scale=scale, tile=tile, overlap=overlap, device=device)
        return lambda: tiled_apply(module, lr, scale=scale, tile=tile, overlap=overlap, device=device)

    return Target(model, "torch", str(device), "fp32", make, how, warmup=0)


def timing_context(repeats: int, device: str | torch.device = "cpu") -> dict:
    """Where and how the figures were measured: `timing.device`, `timing.torch_threads`, `timing.repeats`."""
    return {
        "timing.device": device_name(device),
        "timing.torch_threads": torch.get_num_threads(),
        "timing.repeats": repeats,
    }
