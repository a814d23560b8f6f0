"""PAN, the Pixel Attention Network (Zhao et al., ECCV Workshops 2020), written from the paper.

An efficient pretrained teacher (272 K params at x4) for `teacher.source: pan`. Module
names follow the keys of the official state dicts (PANx{2,3,4}_DF2K.pth), so those
files load strictly:

    conv_first (3x3, 3->nf)
    SCPA_trunk: nb SC-PA blocks, each splitting nf into two nf/2 branches by 1x1 convs:
        k1          plain 3x3 conv branch
        PAConv      pixel-attention conv branch: k4( k3(x) * sigmoid(k2(x)) )
        conv3       1x1 fusion of both branches, plus the block's residual
    trunk_conv (3x3), added to conv_first's output (long skip): the deep features
    U-PA upsampling, once for x2/x3, twice (x2 each) for x4: nearest-neighbour
        interpolation -> upconv (3x3) -> PA (att, x * sigmoid(1x1 conv)) -> HRconv (3x3)
    conv_last (3x3, unf->3) plus a bilinear up-scaling of the LR input (global skip)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# trunk_conv's output is the deep feature map before the upsampler, on the LR grid
# (the same place as SwinIR's conv_after_body: before the long-skip addition).
DEFAULT_FEATURE_LAYERS = ("trunk_conv",)

_SLOPE = 0.2  # LeakyReLU slope throughout


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _SLOPE)


class PA(nn.Module):
    """Pixel attention: a per-pixel, per-channel sigmoid gate from a 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class PAConv(nn.Module):
    """3x3 conv gated by pixel attention computed from the same input, then another 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.k2 = nn.Conv2d(channels, channels, 1)
        self.k3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.k4 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k4(self.k3(x) * torch.sigmoid(self.k2(x)))


class SCPA(nn.Module):
    """Self-calibrated block with pixel attention: a PA branch and a plain conv branch, fused, residual."""

    def __init__(self, nf: int):
        super().__init__()
        half = nf // 2
        self.conv1_a = nn.Conv2d(nf, half, 1, bias=False)
        self.conv1_b = nn.Conv2d(nf, half, 1, bias=False)
        # A one-element Sequential only because the official keys are `k1.0.weight`.
        self.k1 = nn.Sequential(nn.Conv2d(half, half, 3, padding=1, bias=False))
        self.PAConv = PAConv(half)
        self.conv3 = nn.Conv2d(nf, nf, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _lrelu(self.k1(_lrelu(self.conv1_a(x))))
        b = _lrelu(self.PAConv(_lrelu(self.conv1_b(x))))
        return x + self.conv3(torch.cat([a, b], dim=1))


class PAN(nn.Module):
    """LR (B,3,h,w) in [0,1] -> SR (B,3,h*scale,w*scale); scale 2, 3 or 4."""

    def __init__(
        self, scale: int = 4, nf: int = 40, unf: int = 24, nb: int = 16, in_ch: int = 3, out_ch: int = 3
    ):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"PAN supports scale 2, 3 or 4, not {scale}")
        self.scale = scale
        self.conv_first = nn.Conv2d(in_ch, nf, 3, padding=1)
        self.SCPA_trunk = nn.Sequential(*[SCPA(nf) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        # x4 upsamples in two x2 U-PA stages; x2 and x3 in one stage.
        self.upconv1 = nn.Conv2d(nf, unf, 3, padding=1)
        self.att1 = PA(unf)
        self.HRconv1 = nn.Conv2d(unf, unf, 3, padding=1)
        if scale == 4:
            self.upconv2 = nn.Conv2d(unf, unf, 3, padding=1)
            self.att2 = PA(unf)
            self.HRconv2 = nn.Conv2d(unf, unf, 3, padding=1)
        self.conv_last = nn.Conv2d(unf, out_ch, 3, padding=1)

    def _upa(
        self, x: torch.Tensor, factor: int, upconv: nn.Module, att: nn.Module, hrconv: nn.Module
    ) -> torch.Tensor:
        x = upconv(F.interpolate(x, scale_factor=factor, mode="nearest"))
        return _lrelu(hrconv(_lrelu(att(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.SCPA_trunk(fea))
        if self.scale == 4:
            fea = self._upa(fea, 2, self.upconv1, self.att1, self.HRconv1)
            fea = self._upa(fea, 2, self.upconv2, self.att2, self.HRconv2)
        else:
            fea = self._upa(fea, self.scale, self.upconv1, self.att1, self.HRconv1)
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.conv_last(fea) + base
