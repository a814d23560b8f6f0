"""Loss terms and the training objectives built from them.

pixel:      L1(output, HR)
kd:         L1(output, cached teacher output)
perceptual: L1 between VGG19 features of the output and of the target (teacher or HR)
feature:    L1(1x1 projector(student LR-grid features), cached teacher features)

A term with weight 0 is not built at all: no VGG, no projector, nothing loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sharpkd.config import LossParams
from sharpkd.errors import UserError
from sharpkd.fetch import find_file

# torchvision's ImageNet VGG19 (VGG19_Weights.IMAGENET1K_V1); the hash prefix is in the name.
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"

# relu layer name -> index in torchvision's vgg19().features
VGG19_LAYERS = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15, "relu3_4": 17,
    "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
    "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35,
}  # fmt: skip


def find_vgg19_weights(weights_dir: Path) -> Path:
    """VGG19 weights from weights.dir or torchvision's hub cache; a clear error naming both otherwise."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    found = find_file(VGG19_FILE, (weights_dir, hub))
    if found is not None:
        return found
    raise UserError(
        f"loss.perceptual needs the VGG19 ImageNet weights {VGG19_FILE} ({VGG19_URL}), "
        f"found neither in weights.dir ({weights_dir}) nor in torchvision's cache ({hub}). "
        f"Download that file into one of those folders, or set loss.perceptual=0."
    )


class VGGFeatures(nn.Module):
    """Frozen VGG19 truncated after the deepest requested layer; ImageNet-normalised input."""

    def __init__(self, layers: tuple[str, ...], weights_path: Path):
        super().__init__()
        from torchvision.models import vgg19

        unknown = [n for n in layers if n not in VGG19_LAYERS]
        if unknown or not layers:
            raise UserError(
                f"loss.perceptual_layers: unknown {unknown or 'empty list'}; allowed: {', '.join(VGG19_LAYERS)}"
            )
        last = max(VGG19_LAYERS[n] for n in layers)
        self.features = vgg19().features[: last + 1].eval()
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            # Only the convolutional part up to the deepest tap is needed.
            wanted = {k for k in self.features.state_dict()}
            self.features.load_state_dict(
                {k[len("features.") :]: v for k, v in state.items() if k[len("features.") :] in wanted}
            )
        except Exception as exc:
            raise UserError(
                f"{weights_path}: not a valid VGG19 state dict ({str(exc).splitlines()[0]})"
            ) from None
        self.taps = {VGG19_LAYERS[n] for n in layers}
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def perceptual_distance(vgg: VGGFeatures, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = vgg(b)
    return sum(F.l1_loss(fa, fb) for fa, fb in zip(vgg(a), target, strict=True)) / len(target)


class DistillObjective(nn.Module):
    """Student + (optional) projector and VGG: forward(batch) -> (total, terms)."""

    def __init__(
        self,
        student: nn.Module,
        loss: LossParams,
        teacher_feat_channels: int = 0,
        weights_dir: Path | None = None,
    ):
        super().__init__()
        self.student = student
        self.w = {"pixel": loss.pixel, "kd": loss.kd, "perceptual": loss.perceptual, "feature": loss.feature}
        if sum(self.w.values()) <= 0:
            raise UserError("loss: all weights (pixel, kd, perceptual, feature) are 0; nothing to train")
        self.perceptual_target = loss.perceptual_target
        self.vgg = None
        if loss.perceptual > 0:
            self.vgg = VGGFeatures(
                tuple(loss.perceptual_layers), find_vgg19_weights(weights_dir or Path("."))
            )
        self.projector = None
        if loss.feature > 0:
            if teacher_feat_channels <= 0:
                raise UserError(
                    "loss.feature > 0 but the teacher cache has no features (see teacher.feature_layers)"
                )
            self.projector = nn.Conv2d(student.channels, teacher_feat_channels, 1)

    def needed_keys(self) -> tuple[str, ...]:
        keys = ["input"]
        if self.w["pixel"] > 0 or (self.vgg is not None and self.perceptual_target == "hr"):
            keys.append("hr")
        if self.w["kd"] > 0 or (self.vgg is not None and self.perceptual_target == "teacher"):
            keys.append("teacher")
        if self.projector is not None:
            keys.append("feat")
        return tuple(keys)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, feat = self.student.forward_with_features(batch["input"])
        terms: dict[str, torch.Tensor] = {}
        if self.w["pixel"] > 0:
            terms["pixel"] = F.l1_loss(out, batch["hr"])
        if self.w["kd"] > 0:
            terms["kd"] = F.l1_loss(out, batch["teacher"])
        if self.vgg is not None:
            terms["perceptual"] = perceptual_distance(self.vgg, out, batch[self.perceptual_target])
        if self.projector is not None:
            terms["feature"] = F.l1_loss(self.projector(feat), batch["feat"])
        total = sum(self.w[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}


class SuperResolutionObjective(nn.Module):
    """A teacher trained from scratch: L1(model(LR), HR)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.l1_loss(self.model(batch["lr"]), batch["hr"])
        return loss, {"pixel": loss.detach()}
