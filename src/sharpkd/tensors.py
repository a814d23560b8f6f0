"""The pipeline's torch side of the deploy wing's pixels and tiling: the same conversion
(deploy/pixels.py) and the same tiled path (deploy/tiling.py), for torch tensors and modules.

`tiled_apply` is a thin adapter: each tile goes from the NumPy tiler to the torch model (on its device,
under autocast when asked) and back; blending and weights are the deploy wing's, so a teacher cached here
and a student sharpened there are tiled by one piece of code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sharpkd.deploy import pixels, tiling

Model = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 (or NxHxWx3) uint8 / uint16 -> (N,3,H,W) float32 in [0,1] (N=1 for one image).

    One image comes back contiguous (NCHW); a batch as a channels-last view of the NHWC array, as the
    stages have always fed their batches (a conv's float rounding depends on the memory layout, so
    changing either would change cached and trained outputs in the last bit).
    """
    arr = np.ascontiguousarray(img[None] if img.ndim == 3 else img)
    t = torch.from_numpy(pixels.to_float(arr)).permute(0, 3, 1, 2)
    return t.contiguous() if img.ndim == 3 else t


def to_image(t: torch.Tensor, bits: int = 8) -> np.ndarray:
    """(1,3,H,W) or (3,H,W) float in [0,1] -> HxWx3 uint8 (or uint16 when bits=16), rounded."""
    return pixels.batch_to_image(t.detach().float().cpu().numpy(), bits)


def as_torch(fn: Callable[[np.ndarray], np.ndarray]) -> Model:
    """A float32 array function (an ONNX session, sessions.OnnxFunction) as a tensor -> tensor one."""
    return lambda x: torch.from_numpy(fn(x.detach().float().cpu().numpy()))


@torch.no_grad()
def tiled_apply(
    model: Model,
    x: torch.Tensor,
    scale: int = 1,
    tile: int = 256,
    overlap: int = 16,
    align: int = 1,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Run `model` over `x` (1,C,H,W, any device) tile by tile (deploy.tiling.tiled_apply); returns
    (1,C,H*scale,W*scale) float32 on x's device. `scale` is the output/input size ratio (teacher: data.scale,
    student: 1); the tiles run on `device` (default: x's), under autocast with `amp` on CUDA."""
    device = torch.device(device) if device is not None else x.device
    use_amp = amp and device.type == "cuda"

    def run(tile_arr: np.ndarray) -> np.ndarray:
        with torch.autocast(device.type, enabled=use_amp):
            y = model(torch.from_numpy(tile_arr).to(device))
        return y.float().cpu().numpy()

    arr = x.detach().float().cpu().numpy()
    out = tiling.tiled_apply(run, arr, scale=scale, tile=tile, overlap=overlap, align=align)
    return torch.from_numpy(out).to(x.device)


def run_tiled(
    model: Callable,
    img: np.ndarray,
    scale: int,
    tile: int,
    overlap: int,
    align: int = 1,
    device=None,
    amp=False,
) -> np.ndarray:
    """uint8 image in -> uint8 image out through the tiled inference."""
    out = tiled_apply(
        model, to_tensor(img), scale=scale, tile=tile, overlap=overlap, align=align, device=device, amp=amp
    )
    return to_image(out)


def default_device() -> torch.device:
    """CUDA when there is one (training, the teacher cache), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
