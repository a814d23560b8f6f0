"""Loading a sharpening model for inference: ONNX (ONNX Runtime), TorchScript (.pt) or a student checkpoint (.pth).

Every kind is wrapped as a callable tensor -> tensor, so all of them go through
`infer.tiled_apply`, the one inference path: any image size runs in bounded memory,
an ONNX session included. `resolve_model` turns a `models:/` URI (a student registered in MLflow)
into the local ONNX file it names.

Loading checks two things before any output is written. TorchScript carries code that runs when it is
loaded and run, so a .pt is opened only when it is this checkout's own export (its sha256 is one that
the export stage recorded in models/export/model_card.json) or inside `trusting_code()` (`--trust-code`).
And every model is run once on a small test image: its output must be the input's size and finite.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import warnings
from collections.abc import Callable, Iterator
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
# What the export stage records of every file it writes (model_card.json's "files": name -> sha256).
EXPORT_CARD = DEFAULT_MODEL.parent / "model_card.json"
# The side of the test image a loaded model is run on (rounded up to its grid).
PROBE_SIDE = 32
_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("sharpkd_trust_code", default=False)


@contextlib.contextmanager
def trusting_code(allowed: bool = True) -> Iterator[None]:
    """Within the block, `load_model` opens any TorchScript file (`--trust-code`: its code runs), not only
    this checkout's own export."""
    token = _TRUST_CODE.set(allowed)
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_session(path: str | Path, device: str = "cpu", threads: int = 0, profile_prefix: str = ""):
    """An ONNX Runtime session on the CPU or CUDA execution provider; a clear error when that cannot be had.
    With `profile_prefix`, ONNX Runtime's profiler records every kernel (`session.end_profiling()`)."""
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
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
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


# ONNX input types -> the array type the session takes.
ONNX_IMAGE_TYPES = {"tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


class OnnxFunction:
    """An ONNX Runtime session as a float32 tensor -> tensor function in [0,1]: float16 models are cast at
    the boundary, uint8 models (the INT8 export) get the image as 0-255 bytes, rounded, and give it back /255.
    `native` and `run_native` skip that conversion (the timing path times a model on its own pixel type)."""

    def __init__(self, session):
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.dtype = ONNX_IMAGE_TYPES.get(inp.type, np.float32)
        hw = inp.shape[-2:] if len(inp.shape) == 4 else []
        # (height, width) of a model that takes one size only, else None.
        self.fixed_size = (
            tuple(hw) if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) else None
        )

    def native(self, x: torch.Tensor) -> np.ndarray:
        """`x` (float in [0,1]) as the array the model takes."""
        arr = x.detach().cpu().numpy()
        if self.dtype == np.uint8:
            return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        return arr.astype(self.dtype, copy=False)

    def run_native(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: arr})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run_native(self.native(x))
        if out.dtype == np.uint8:
            return torch.from_numpy(out).float().div_(255.0)
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

    def apply(self, x: torch.Tensor, tile: int, overlap: int, what: str | Path | None = None) -> torch.Tensor:
        """(1,3,H,W) on the CPU -> (1,3,H,W) float32 on the CPU, tile by tile. A tile whose output is not
        its input's size is a UserError; with `what` (the image's name) so is a non-finite output (not
        checked per video frame: a pass over a 1080p frame costs ~12 ms; the test at load did it once)."""

        def checked(t: torch.Tensor) -> torch.Tensor:
            y = self.fn(t)
            self._refuse(_size_problem(t, y))
            return y

        out = tiled_apply(
            checked, x, scale=1, tile=tile, overlap=overlap, align=self.align, device=self.tile_device
        )
        if what is not None and not bool(out.sum().isfinite()):
            self._refuse(f"its output on {what} holds NaN or infinite values")
        return out

    def _refuse(self, problem: str | None) -> None:
        if problem:
            raise UserError(f"{self.path}: not a sharpening model: {problem}; nothing was written")

    def check_outputs(self) -> None:
        """Run once on a small test image (the model's own size where it takes one size only): a UserError
        naming the file when the output is not the input's size, not finite, or cannot be computed."""
        fixed = getattr(self.fn, "fixed_size", None)
        side = -(-PROBE_SIDE // self.align) * self.align
        h, w = fixed or (side, side + self.align)
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                y = self.fn(x.to(self.tile_device or "cpu"))
        except Exception as exc:  # whatever the runtime raises (shape errors, missing ops): one line
            raise UserError(
                f"{self.path}: the model fails on a {h}x{w} test image ({_first_line(exc)})"
            ) from None
        self._refuse(_size_problem(x, y))
        if not bool(torch.isfinite(y).all()):
            self._refuse(f"its output on a {h}x{w} test image holds NaN or infinite values")

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {self.device})"


def _size_problem(x: torch.Tensor, y) -> str | None:
    """Why `y` is not a sharpening model's output for input `x` (None: it has x's shape)."""
    shape = tuple(getattr(y, "shape", ()))
    if shape == tuple(x.shape):
        return None
    got = "x".join(map(str, shape)) if shape else f"a {type(y).__name__}, not a tensor"
    return f"a {'x'.join(map(str, x.shape))} input gives {got} (a sharpening model keeps the size)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")


MODEL_KINDS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "checkpoint"}


def resolve_model(spec: str | Path | None) -> Path | None:
    """The model file `--model` names: a path as it is, or a registered student, `models:/<name>/<version>`,
    `models:/<name>/latest` or `models:/<name>@<alias>`, fetched from the project's MLflow store into a
    local cache (sharpkd.tracking.registry). None stays None (the caller's default model)."""
    if spec is None or spec == "":
        return None
    if str(spec).startswith("models:/"):
        from sharpkd.tracking.registry import fetch_model

        return fetch_model(str(spec))
    return Path(spec)


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
        raise UserError(
            f"{path}: model not found; {how}, or pass --model PATH to a .onnx, .pt or .pth file "
            "(or a registered student, models:/<name>/<version>)"
        )
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


def export_digests(card: Path = EXPORT_CARD) -> set[str]:
    """The sha256 of every file the export stage wrote, as its model card records them (none without one)."""
    try:
        files = json.loads(card.read_text()).get("files", {})
        return {
            f["sha256"] for f in files.values() if isinstance(f, dict) and isinstance(f.get("sha256"), str)
        }
    except (OSError, ValueError, AttributeError):
        return set()


def _check_code_allowed(path: Path, data: bytes) -> None:
    """TorchScript runs its own code: refused unless it is this checkout's export or the user trusts it."""
    if _TRUST_CODE.get() or hashlib.sha256(data).hexdigest() in export_digests():
        return
    raise UserError(
        f"{path}: a TorchScript model runs the code it carries, and this one is not this checkout's export "
        f"(its sha256 is not among the files of {EXPORT_CARD}); use a .onnx or .pth model, or pass "
        "--trust-code to run it if you trust whoever made it"
    )


def _load_torchscript(path: Path, device: str) -> InferenceModel:
    _check_device(device)
    try:
        data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    _check_code_allowed(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still loads
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch.jit raises RuntimeError subclasses with long C++ traces
        raise UserError(f"{path}: not a TorchScript model ({_first_line(exc)})") from None
    module.eval()
    align = int(getattr(module, "scale", ANY_SCALE_GRID))
    return InferenceModel(module, "torchscript", path, device, align, device)


LOADERS = {"onnx": _load_onnx, "checkpoint": _load_checkpoint, "torchscript": _load_torchscript}


def load_model(path: str | Path | None = None, device: str = "cpu") -> InferenceModel:
    """Open a .onnx, TorchScript .pt or student .pth for inference on `device`, checked on a test image
    (InferenceModel.check_outputs). A .pt that is not this checkout's export only inside `trusting_code()`."""
    path, kind = model_kind(path)
    model = LOADERS[kind](path, device)
    model.check_outputs()
    return model


def onnx_target(path: str | Path, device: str, threads: int) -> Target:
    """The timing target (timing.Target) of an ONNX student: a fresh session per timing, released after it.

    The file is opened once now, so a bad one fails before any timing; its precision comes from the
    metadata export.py and quantize.py write, else from its input type. The frame goes in and comes out
    in the model's own pixel type (float32, float16, or uint8 for the INT8 export, as a video frame is
    decoded and encoded): the conversion from float32 is not timed.
    """
    path = Path(path)
    fn = OnnxFunction(ort_session(path, device, threads))
    recorded = fn.session.get_modelmeta().custom_metadata_map.get("sharpkd.precision")
    precision = recorded or ("fp16" if fn.dtype.__name__ == "float16" else "fp32")
    del fn

    def make(x: torch.Tensor):
        session = OnnxFunction(ort_session(path, device, threads))
        arr = session.native(x)
        return lambda: session.run_native(arr)

    return Target("student", "onnxruntime", device, precision, make)
