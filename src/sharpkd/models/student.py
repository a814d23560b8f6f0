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

from sharpkd.models.rep import RepConv3x3, fold_rep

ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class Student(nn.Module):
    """`block="rep"` trains each 3x3 conv as a sum of linear branches (models/rep.py); `deploy()` folds
    them into the plain network, which is what is saved, exported and run: same graph, same cost."""

    def __init__(
        self,
        scale: int = 4,
        channels: int = 32,
        blocks: int = 4,
        activation: str = "relu",
        block: str = "plain",
        rep_expand: float = 2.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if block not in ("plain", "rep"):
            raise ValueError(f"block must be 'plain' or 'rep', got {block!r}")
        self.scale = scale
        self.channels = channels
        self.block = block
        self.rep_expand = rep_expand
        act = ACTIVATIONS[activation]
        lr_channels = 3 * scale * scale

        def conv3x3(cin: int, cout: int, identity: bool | None = None) -> nn.Module:
            if block == "plain":
                return nn.Conv2d(cin, cout, 3, padding=1)
            # online_fold: one conv from the folded weights per step, as fast as the plain student.
            return RepConv3x3(cin, cout, expand=rep_expand, identity=identity, online_fold=True)

        self.head = nn.Sequential(conv3x3(lr_channels, channels), act())
        self.body = nn.Sequential(*[m for _ in range(blocks) for m in (conv3x3(channels, channels), act())])
        self.tail = conv3x3(channels, lr_channels, identity=False)
        # He init keeps the conv stack's activations alive (PyTorch's default init shrinks them
        # layer after layer and the ReLUs die within a few steps). RepConv3x3 inits its own branches.
        for m in [*self.head, *self.body]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Start as the identity: the residual branch begins at zero, so step 0 equals the input.
        if isinstance(self.tail, RepConv3x3):
            self.tail.zero_init()
        else:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def deploy(self) -> Student:
        """The plain network computing the same function (a copy; `self` if it is plain already)."""
        if self.block == "plain":
            return self
        plain = fold_rep(self)
        plain.block = "plain"
        return plain

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
            "block": self.block,
            "rep_expand": self.rep_expand,
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

    from sharpkd.errors import UserError, load_error

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: student weights not found (run `dvc repro distill` first)")
    try:
        # weights_only: tensors and plain containers, never code (a crafted pickle is refused).
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
            raise ValueError("expected keys 'arch' and 'state_dict'")
        model = Student(**ckpt["arch"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # a truncated, foreign or code-carrying file
        raise UserError(f"{path}: not a sharpkd student checkpoint ({load_error(exc)})") from None
    return model.to(device).eval()
