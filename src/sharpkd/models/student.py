"""The student: a tiny CNN that works on the low-resolution grid of the degraded image.

degraded (full size) -> pixel-unshuffle by `scale` -> 3x3 convs at LR resolution
-> pixel-shuffle -> + degraded (global residual). Its body features live on the
same grid as the teacher's deep features, so feature distillation needs only a
1x1 projector (in losses.py, not part of the exported model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class Student(nn.Module):
    def __init__(self, scale: int = 4, channels: int = 32, blocks: int = 4, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.scale = scale
        self.channels = channels
        act = ACTIVATIONS[activation]
        lr_channels = 3 * scale * scale
        self.head = nn.Sequential(nn.Conv2d(lr_channels, channels, 3, padding=1), act())
        self.body = nn.Sequential(
            *[m for _ in range(blocks) for m in (nn.Conv2d(channels, channels, 3, padding=1), act())]
        )
        self.tail = nn.Conv2d(channels, lr_channels, 3, padding=1)
        # He init keeps the conv stack's activations alive (PyTorch's default init shrinks them
        # layer after layer and the ReLUs die within a few steps).
        for m in [*self.head, *self.body]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Start as the identity: the residual branch begins at zero, so step 0 equals the input.
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, LR-grid body features). Any H, W: padded to a multiple of scale, cropped back."""
        s = self.scale
        h, w = x.shape[-2], x.shape[-1]
        pad_h, pad_w = (s - h % s) % s, (s - w % s) % s
        xp = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        feat = self.body(self.head(F.pixel_unshuffle(xp, s)))
        out = F.pixel_shuffle(self.tail(feat), s) + xp
        return out[..., :h, :w], feat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def arch_kwargs(self) -> dict:
        acts = {type(m) for m in self.head}
        name = next(k for k, v in ACTIVATIONS.items() if v in acts)
        return {
            "scale": self.scale,
            "channels": self.channels,
            "blocks": len(self.body) // 2,
            "activation": name,
        }


def conv_macs(model: nn.Module, height: int = 1080, width: int = 1920, scale_in: int = 1) -> int:
    """Multiply-accumulates of one forward pass on an input of height x width, counted from Conv2d layers.

    Counted with forward hooks on a real (small) pass and scaled to the requested size,
    so it holds for any conv architecture whose cost is proportional to the pixel count.
    """
    probe_h, probe_w = 64, 64
    total = 0

    def hook(mod: nn.Conv2d, inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total += out.numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, probe_h, probe_w, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return int(total * (height * width) / (probe_h * probe_w) / scale_in**2)


def save_student(model: Student, path, extra: dict | None = None) -> None:
    """A self-describing checkpoint: architecture kwargs + weights (+ anything in `extra`)."""
    from sharpkd.files import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"arch": model.arch_kwargs(), "state_dict": model.state_dict(), **(extra or {})}, tmp)


def load_student(path, device: str | torch.device = "cpu") -> Student:
    from pathlib import Path

    from sharpkd.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: student weights not found (run `dvc repro distill` first)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path}: not a sharpkd student checkpoint (expected keys 'arch' and 'state_dict')")
    model = Student(**ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
