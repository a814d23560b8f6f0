"""A small EDSR-style teacher trained from scratch (teacher.source=train).

Works on the LR image like published SR networks: head conv -> residual blocks
-> conv (the deep features distilled to the student, on the LR grid) -> long
skip -> pixel-shuffle upsampler. A bicubic skip from the input lets a short
CPU budget start from bicubic quality instead of from zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_FEATURE_LAYERS = ("body",)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class EDSR(nn.Module):
    def __init__(self, scale: int = 4, channels: int = 32, blocks: int = 4):
        super().__init__()
        self.scale, self.channels, self.blocks = scale, channels, blocks
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(
            *[ResBlock(channels) for _ in range(blocks)], nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.upsample = nn.Sequential(
            nn.Conv2d(channels, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.head(lr)
        x = x + self.body(x)
        base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + self.upsample(x)

    def arch_kwargs(self) -> dict:
        return {"scale": self.scale, "channels": self.channels, "blocks": self.blocks}
