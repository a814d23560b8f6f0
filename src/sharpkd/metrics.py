"""The one metrics module: pyiqa PSNR / SSIM / LPIPS with the conventions of published SR tables.

PSNR and SSIM: Y channel of YCbCr (BT.601), `scale` pixels of border cropped,
on uint8-rounded images: pyiqa's `color_space='ycbcr'`, `test_y_channel=True`,
`crop_border=scale`. (pyiqa's default color_space 'yiq' reads about 1.3 dB lower.)
On Set5 x4 (MATLAB LR, PIL bicubic up-scaling) this gives 28.43 dB / 0.8101,
the published 28.42 / 0.8104.

LPIPS (AlexNet, v0.1) needs two pretrained files: torchvision's ImageNet AlexNet
and pyiqa's LPIPS linear layers. pyiqa would download both with no timeout; here
each is looked up first in `weights.dir`, torch hub's `checkpoints/` and pyiqa's
cache (`<hub>/pyiqa/`), and only a missing one is downloaded, into that standard
cache, with a short socket timeout. When they cannot be had the value is None
and `lpips_reason` says why: never a made-up number, never a crash.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sharpkd.errors import UserError, brief
from sharpkd.fetch import DownloadError, download, find_file, resolve_weights_dir, without_home
from sharpkd.tensors import run_tiled, to_tensor

# PSNR of identical images is infinite; pyiqa adds eps=1e-8 to the MSE, which makes it 80 dB.
# Capped here too, so no inf ever reaches JSON.
PSNR_CAP = 80.0
# pyiqa's SSIM uses an 11x11 Gaussian window: after cropping the border it needs 11 pixels.
SSIM_WINDOW = 11
# Seconds a download may wait on a silent socket (connect or read), so an offline machine
# behind a firewall that drops packets fails within seconds, not minutes.
DOWNLOAD_TIMEOUT_S = 10.0


def min_side(scale: int) -> int:
    """Smallest image side the metrics accept: the cropped border on both sides plus the SSIM window."""
    return 2 * scale + SSIM_WINDOW


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    if img.dtype != np.uint8:
        raise TypeError(f"metrics expect uint8 images, got {img.dtype}")
    return to_tensor(img)


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    cache_subdir: str  # where it goes under torch hub's folder: "checkpoints" (torchvision) or "pyiqa"
    hash_prefix: str | None  # sha256 prefix to check a download against (torchvision's convention)


def _alexnet_url() -> str:
    """What pyiqa's LPIPS asks torchvision for (models.alexnet(weights='IMAGENET1K_V1'))."""
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1.url


def _lpips_files() -> dict[str, WeightFile]:
    """The two files pyiqa's LPIPS (alex, v0.1) loads, with the URLs the installed libraries use."""
    from pyiqa.archs.lpips_arch import default_model_urls

    alex_url = _alexnet_url()
    alex_name = alex_url.rsplit("/", 1)[1]
    m = torch.hub.HASH_REGEX.search(alex_name)
    lin_url = default_model_urls["0.1_alex"]
    return {
        "alexnet": WeightFile(alex_name, alex_url, "checkpoints", m.group(1) if m else None),
        "lpips": WeightFile(lin_url.rsplit("/", 1)[1], lin_url, "pyiqa", None),
    }


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir())


def _find_or_download(spec: WeightFile, weights_dir: Path) -> Path:
    """The local file, else a bounded download into the standard cache; OSError saying what was tried."""
    hub = _hub_dir()
    places = [weights_dir, hub / "checkpoints", hub / "pyiqa"]
    found = find_file(spec.filename, places)
    if found is not None:
        return found
    dest = hub / spec.cache_subdir / spec.filename
    print(f"[metrics] downloading {spec.filename} from {spec.url} (timeout {DOWNLOAD_TIMEOUT_S:g}s)")
    digest = ("sha256", spec.hash_prefix) if spec.hash_prefix else None
    try:
        download(spec.url, dest, digest=digest, timeout=DOWNLOAD_TIMEOUT_S, attempts=1)
    except UserError as exc:
        cause = exc.reason if isinstance(exc, DownloadError) else brief(str(exc))
        print(f"[metrics] {spec.filename}: not in {', '.join(map(str, places))}; {cause}")
        # Short, no folders: it is kept beside the null values (eval.json, the model card, MLflow).
        raise OSError(f"{spec.filename} not found, download failed: {cause}") from None
    return dest


@contextlib.contextmanager
def _hub_holding(path: Path, name: str) -> Iterator[None]:
    """torch hub pointed at a temporary folder whose checkpoints/`name` is `path`, so torchvision loads it offline."""
    with tempfile.TemporaryDirectory(prefix="sharpkd-hub-") as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        os.symlink(path.resolve(), Path(tmp) / "checkpoints" / name)
        previous = torch.hub._hub_dir  # restored as it was, "unset" included
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


def load_lpips(weights_dir: Path):
    """pyiqa's LPIPS metric built from local files (downloaded first when missing and possible)."""
    import pyiqa
    from pyiqa.archs.arch_util import clean_state_dict

    files = _lpips_files()
    alex = _find_or_download(files["alexnet"], weights_dir)
    lin = _find_or_download(files["lpips"], weights_dir)
    # pyiqa loads the linear layers with strict=False: a wrong file would silently leave them
    # random and give made-up numbers, so check the keys first.
    try:
        state = clean_state_dict(torch.load(lin, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise OSError(f"{lin}: not a readable LPIPS weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not any(
        re.fullmatch(r"lin\d+\.model\.1\.weight", str(k)) for k in state
    ):
        raise OSError(f"{lin}: no LPIPS linear-layer weights (lin*.model.1.weight) in it")
    with _hub_holding(alex, _alexnet_url().rsplit("/", 1)[1]):
        metric = pyiqa.create_metric("lpips", device="cpu", pretrained_model_path=str(lin))
    # (lins.N.* are the same tensors as linN.*, listed twice by the ModuleList.)
    missing = [k for k in metric.net.state_dict() if re.match(r"lin\d+\.", k) and k not in state]
    if missing:
        raise OSError(f"{lin}: LPIPS weights incomplete (missing {', '.join(missing[:3])})")
    return metric


class QualityMetrics:
    """Build once, score many: `QualityMetrics(scale).score(output_uint8, reference_uint8)`.

    `weights_dir` is where LPIPS weight files are looked for first (weights.dir;
    None = $SHARPKD_WEIGHTS_DIR or ~/.cache/sharpkd/weights).
    """

    def __init__(self, scale: int, lpips: bool = True, weights_dir: str | Path | None = None):
        import pyiqa

        self.scale = scale
        self.min_side = min_side(scale)
        kw = {"test_y_channel": True, "color_space": "ycbcr", "crop_border": scale}
        self._psnr = pyiqa.create_metric("psnr", device="cpu", **kw)
        self._ssim = pyiqa.create_metric("ssim", device="cpu", **kw)
        self._lpips = None
        self.lpips_reason: str | None = "LPIPS not requested (eval.lpips: false)"
        if lpips:
            folder = Path(weights_dir) if weights_dir else resolve_weights_dir("")
            try:
                self._lpips = load_lpips(folder)
                self.lpips_reason = None
            except Exception as exc:  # no network and no cached weights, most often
                # One whole short line: it is copied to eval.json, the model card and the MLflow params.
                self.lpips_reason = "no LPIPS: " + brief(without_home(str(exc)) or type(exc).__name__, 110)
                print(f"[metrics] LPIPS recorded as null: {self.lpips_reason}")

    @torch.no_grad()
    def score(self, out: np.ndarray, ref: np.ndarray) -> dict:
        if out.shape != ref.shape:
            raise ValueError(f"output {out.shape} and reference {ref.shape} differ in size")
        if min(ref.shape[:2]) < self.min_side:
            raise ValueError(
                f"image {ref.shape[1]}x{ref.shape[0]} is too small to score: each side must be at least "
                f"{self.min_side} pixels (a {self.scale}-pixel border on both sides plus the {SSIM_WINDOW}-pixel SSIM window)"
            )
        a, b = _to_tensor(out), _to_tensor(ref)
        psnr = float(self._psnr(a, b))
        lpips = float(self._lpips(a, b)) if self._lpips is not None else None
        return {
            "psnr": PSNR_CAP if not math.isfinite(psnr) else min(psnr, PSNR_CAP),
            "ssim": float(self._ssim(a, b)),
            "lpips": lpips,
        }


def mean_scores(rows: Sequence[dict]) -> dict:
    keys = {k for r in rows for k in r if isinstance(r[k], int | float) or r[k] is None}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals and len(vals) == len(rows) else None
    return out


def validate(
    model: Callable, images, metrics, *, use: str, scale_out: int, tile: int, overlap: int, align: int = 1
) -> dict:
    """Mean PSNR/SSIM of `model` over validation images; `use` picks its input ('lr' for a teacher, 'input' for a student)."""
    device = None
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        device = p.device if p is not None else None
    rows = []
    for im in images:
        out = run_tiled(model, getattr(im, use), scale_out, tile, overlap, align, device=device)
        s = metrics.score(out, im.hr)
        rows.append({"psnr": s["psnr"], "ssim": s["ssim"]})
    return mean_scores(rows)
