"""Loading a sharpening model for inference: ONNX (ONNX Runtime), TorchScript (.pt) or a student checkpoint (.pth).

Every kind is wrapped as a callable tensor -> tensor, so all of them go through
`infer.tiled_apply`, the one inference path: any image size runs in bounded memory,
an ONNX session included.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sharpkd.errors import UserError
from sharpkd.inference import tiled_apply
from sharpkd.timing import Target

DEFAULT_MODEL = Path("models/export/student.onnx")
# A multiple of every supported scale (2, 3, 4): tiles whose origins are multiples of
# it never shift a student's pixel-unshuffle grid, whatever its scale.
ANY_SCALE_GRID = 12
# Written into the ONNX metadata by export.py, so a session knows its grid.
SCALE_KEY = "sharpkd.scale"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_session(path: str | Path, device: str = "cpu", threads: int = 0):
    """An ONNX Runtime session on the CPU or CUDA execution provider; a clear error when that cannot be had."""
    import onnxruntime as ort

    path = Path(path)
    if device == "cuda":
        if not ort_cuda_available():
            raise UserError(
                f"--device cuda: ONNX Runtime has no CUDA execution provider here "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use --device cpu"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's notes about node placement are noise here
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for broken or unsupported files
        raise UserError(f"{path}: ONNX Runtime cannot load it ({exc})") from None
    # The CUDA provider falls back to the CPU silently when its libraries are missing.
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError(
            f"{path}: the CUDA execution provider could not be initialised (CUDA/cuDNN libraries missing?)"
        )
    return session


class OnnxFunction:
    """An ONNX Runtime session as a tensor -> tensor function (float16 models are cast at the boundary)."""

    def __init__(self, session):
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(self.dtype, copy=False)
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(out.astype(np.float32, copy=False))


@dataclass
class InferenceModel:
    """A loaded model: `fn` maps (B,3,H,W) float32 in [0,1] to the same shape; `apply` runs it tiled."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    kind: str  # "onnx" | "torchscript" | "checkpoint"
    path: Path
    device: str
    align: int  # tile origins are multiples of this (the student's scale)
    tile_device: str | None  # where tiled_apply sends the tiles (None: the model handles it, as ORT does)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def apply(self, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """(1,3,H,W) on the CPU -> (1,3,H,W) float32 on the CPU, tile by tile."""
        return tiled_apply(
            self.fn, x, scale=1, tile=tile, overlap=overlap, align=self.align, device=self.tile_device
        )

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {self.device})"


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")


MODEL_KINDS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "checkpoint"}


def model_kind(path: str | Path | None = None) -> tuple[Path, str]:
    """(path, kind) of a model file to open: kind is onnx, torchscript or checkpoint (by its suffix);
    a clear error when the file is missing or of another type. None means DEFAULT_MODEL."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_file():
        how = (
            "produce it with `dvc repro export`"
            if path == DEFAULT_MODEL
            else "check the path (models/export/ is written by `dvc repro export`)"
        )
        raise UserError(f"{path}: model not found; {how}, or pass --model PATH to a .onnx, .pt or .pth file")
    kind = MODEL_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path}: unknown model type '{path.suffix.lower()}' (use .onnx, .pt TorchScript or a .pth student checkpoint)"
        )
    return path, kind


def _load_onnx(path: Path, device: str) -> InferenceModel:
    if device not in ("cpu", "cuda"):
        _check_device(device)
    session = ort_session(path, device)  # checks the CUDA provider itself (torch's CUDA is not needed)
    meta = session.get_modelmeta().custom_metadata_map
    align = int(meta.get(SCALE_KEY, ANY_SCALE_GRID))
    return InferenceModel(OnnxFunction(session), "onnx", path, device, align, None)


def _load_checkpoint(path: Path, device: str) -> InferenceModel:
    from sharpkd.models.student import load_student

    _check_device(device)
    student = load_student(path, device)
    return InferenceModel(student, "checkpoint", path, device, student.scale, device)


def _load_torchscript(path: Path, device: str) -> InferenceModel:
    _check_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still loads
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch.jit raises RuntimeError subclasses with long C++ traces
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a TorchScript model ({first})") from None
    module.eval()
    align = int(getattr(module, "scale", ANY_SCALE_GRID))
    return InferenceModel(module, "torchscript", path, device, align, device)


LOADERS = {"onnx": _load_onnx, "checkpoint": _load_checkpoint, "torchscript": _load_torchscript}


def load_model(path: str | Path | None = None, device: str = "cpu") -> InferenceModel:
    """Open a .onnx, TorchScript .pt or student .pth for inference on `device`."""
    path, kind = model_kind(path)
    return LOADERS[kind](path, device)


def onnx_target(path: str | Path, device: str, threads: int) -> Target:
    """The timing target (timing.Target) of an ONNX student: a fresh session per timing, released after it.

    The file is opened once now, so a bad one fails before any timing; its precision comes from the
    metadata export.py and quantize.py write (INT8 keeps float32 I/O), else from its input type.
    """
    path = Path(path)
    fn = OnnxFunction(ort_session(path, device, threads))
    recorded = fn.session.get_modelmeta().custom_metadata_map.get("sharpkd.precision")
    precision = recorded or ("fp16" if fn.dtype.__name__ == "float16" else "fp32")
    del fn

    def make(x: torch.Tensor):
        session = OnnxFunction(ort_session(path, device, threads))
        return lambda: session(x)

    return Target("student", "onnxruntime", device, precision, make)
