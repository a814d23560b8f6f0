"""Loss terms and the training objectives built from them.

pixel:            L1(output, HR)
kd:               L1(output, cached teacher output)
perceptual:       L1 between VGG19 features of the output and of the target (teacher or HR)
feature:          L1(1x1 projector(student LR-grid features), cached teacher features): the student's
                  features must carry the teacher's (reduced) features, through a learned projection
feature_affinity: mean squared difference between the spatial affinity matrices (FAKD) of the
                  student's and the teacher's LR-grid features: cosine similarity between every two
                  positions of a crop, after centring each channel over the crop. No projector and no
                  channel matching: only the structure (which positions look alike) is distilled, not
                  the feature values. Computed through channel Gram matrices, never forming the
                  (hw x hw) matrices: O(hw C^2) per crop instead of O((hw)^2 C).

A term with weight 0 is not built at all: no VGG, no projector, nothing loaded. A batch with
`labelled` (B,) (teacher-only crops have 0 there: they have no HR) weighs the terms that compare
with HR per crop, and averages them over the labelled crops only; kd and the feature terms use all.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sharpkd.config import LossParams
from sharpkd.errors import UserError, load_error
from sharpkd.fetch import (
    PRETRAINED,
    DownloadError,
    find_or_download,
    resolve_weights_dir,
    torch_hub_checkpoints,
)

# torchvision's ImageNet VGG19 (VGG19_Weights.IMAGENET1K_V1); the sha256 prefix is in the name.
# Where it is fetched from (and the hash it is verified against) is fetch.PRETRAINED["vgg19"].
VGG19_FILE = PRETRAINED["vgg19"]["filename"]
VGG19_URL = PRETRAINED["vgg19"]["url"]

# relu layer name -> index in torchvision's vgg19().features
VGG19_LAYERS = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15, "relu3_4": 17,
    "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
    "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35,
}  # fmt: skip


def fetch_vgg19_weights(weights_dir: Path) -> Path:
    """The VGG19 weights from weights.dir or torch's hub cache (`torch.hub.get_dir()/checkpoints`), else
    downloaded into the first writable of those and verified against torchvision's hash (the sha256
    prefix in the file's name, checked as torch.hub checks it; a file that fails is removed). A file
    already in one of those folders is used as it is, as torch.hub uses its cache. One line naming the
    file, its URL and both folders when it is nowhere and cannot be downloaded (no network)."""
    spec = PRETRAINED["vgg19"]  # read now, not at import: tests point it at a local server
    hub = torch_hub_checkpoints()
    try:
        return find_or_download(spec["filename"], spec["url"], ("sha256", spec["sha256"]), (weights_dir, hub))
    except DownloadError as exc:
        raise UserError(
            f"loss.perceptual needs the VGG19 ImageNet weights {spec['filename']} ({spec['url']}), "
            f"found neither in weights.dir ({weights_dir}) nor in torch's hub cache ({hub}), "
            f"and it could not be downloaded ({exc.reason}). "
            f"Download that file into one of those folders, or set loss.perceptual=0."
        ) from None


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
            raise UserError(f"{weights_path}: not a valid VGG19 state dict ({load_error(exc)})") from None
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


def perceptual_distance(
    vgg: VGGFeatures, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    with torch.no_grad():
        target = vgg(b)
    if weight is None:
        return sum(F.l1_loss(fa, fb) for fa, fb in zip(vgg(a), target, strict=True)) / len(target)
    per = sum((fa - fb).abs().flatten(1).mean(1) for fa, fb in zip(vgg(a), target, strict=True)) / len(target)
    return weighted_mean(per, weight)


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample values over the samples weighted 1 (0 when none is)."""
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def masked_l1(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """L1 over the whole batch, or over the samples with weight 1 when a per-sample weight is given."""
    if weight is None:
        return F.l1_loss(a, b)
    return weighted_mean((a - b).abs().flatten(1).mean(1), weight)


def _unit_positions(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, hw): each channel centred over the crop, each position's vector of unit length."""
    f = feat.flatten(2)
    return F.normalize(f - f.mean(dim=2, keepdim=True), dim=1, eps=1e-6)


def affinity(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, hw, hw): cosine similarity between positions, each channel centred over the crop."""
    f = _unit_positions(feat)
    return f.transpose(1, 2) @ f


def affinity_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean((affinity(student) - affinity(teacher))**2), any channel counts, without the (hw x hw) matrices.

    With S, T the (C, hw) unit-position features of a crop, ||S'S - T'T||^2 = ||SS'||^2 - 2||ST'||^2 + ||TT'||^2
    (Frobenius norms of channel Gram matrices; ' is the transpose).
    """
    s, t = _unit_positions(student), _unit_positions(teacher.to(student.dtype))
    n = s.shape[-1]

    def gram2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2)).pow(2).sum(dim=(1, 2))

    per_crop = (gram2(s, s) - 2 * gram2(s, t) + gram2(t, t)).clamp_min(0) / (n * n)
    return per_crop.mean()


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
        self.w = {
            "pixel": loss.pixel,
            "kd": loss.kd,
            "perceptual": loss.perceptual,
            "feature": loss.feature,
            "feature_affinity": loss.feature_affinity,
        }
        if sum(self.w.values()) <= 0:
            raise UserError(
                "loss: all weights (pixel, kd, perceptual, feature, feature_affinity) are 0; nothing to train"
            )
        self.perceptual_target = loss.perceptual_target
        self.vgg = None
        if loss.perceptual > 0:
            weights = fetch_vgg19_weights(weights_dir or resolve_weights_dir())
            self.vgg = VGGFeatures(tuple(loss.perceptual_layers), weights)
        self.projector = None
        if loss.feature > 0:
            if teacher_feat_channels <= 0:
                raise UserError(
                    "loss.feature > 0 but the teacher cache has no features (see teacher.feature_layers)"
                )
            self.projector = nn.Conv2d(student.channels, teacher_feat_channels, 1)
        if loss.feature_affinity > 0 and teacher_feat_channels <= 0:
            raise UserError(
                "loss.feature_affinity > 0 but the teacher cache has no features (see teacher.feature_layers)"
            )

    def needed_keys(self) -> tuple[str, ...]:
        keys = ["input"]
        if self.w["pixel"] > 0 or (self.vgg is not None and self.perceptual_target == "hr"):
            keys.append("hr")
        if self.w["kd"] > 0 or (self.vgg is not None and self.perceptual_target == "teacher"):
            keys.append("teacher")
        if self.projector is not None or self.w["feature_affinity"] > 0:
            keys.append("feat")
        return tuple(keys)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, feat = self.student.forward_with_features(batch["input"])
        labelled = batch.get("labelled")  # present when the batch holds teacher-only crops (no HR)
        terms: dict[str, torch.Tensor] = {}
        if self.w["pixel"] > 0:
            terms["pixel"] = masked_l1(out, batch["hr"], labelled)
        if self.w["kd"] > 0:
            terms["kd"] = F.l1_loss(out, batch["teacher"])
        if self.vgg is not None:
            hr_target = self.perceptual_target == "hr"
            terms["perceptual"] = perceptual_distance(
                self.vgg, out, batch[self.perceptual_target], labelled if hr_target else None
            )
        if self.projector is not None:
            terms["feature"] = F.l1_loss(self.projector(feat), batch["feat"])
        if self.w["feature_affinity"] > 0:
            terms["feature_affinity"] = affinity_distance(feat, batch["feat"])
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
