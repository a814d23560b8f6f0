"""The one ONNX Runtime session builder, and a session as a float32 array function.

Every session (sharpen, video, serving, bench, the pipeline's parity, timing and INT8 checks) is made
by `ort_session`, its options given as arguments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sharpkd.deploy.pixels import to_float, to_uint
from sharpkd.errors import UserError

CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
CPU_PROVIDERS = ("CPUExecutionProvider",)
# ONNX Runtime's threads busy-wait between runs unless told not to (sessions.ort_session(spinning=False)).
SPINNING = "session.intra_op.allow_spinning"
# ONNX input types -> the pixel type a session takes.
PIXEL_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers_for(device: str) -> tuple[str, ...]:
    """The execution providers for `device` (cpu | cuda); a clear error when CUDA's is not installed."""
    if device == "cpu":
        return CPU_PROVIDERS
    if device != "cuda":
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if not ort_cuda_available():
        import onnxruntime as ort

        raise UserError(
            f"--device cuda: ONNX Runtime has no CUDA execution provider here "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use --device cpu"
        )
    return CUDA_PROVIDERS


def ort_session(
    path: str | Path, device: str = "cpu", threads: int = 0, profile_prefix: str = "", spinning: bool = True
):
    """An ONNX Runtime session on the CPU or CUDA execution provider; a clear error when that cannot be had.
    `threads`: intra-op threads (0: ONNX Runtime's default). With `profile_prefix`, ONNX Runtime's profiler
    records every kernel (`session.end_profiling()`). `spinning=False`: its threads sleep between runs (a
    video shares the CPU with the decoder and the encoder)."""
    import onnxruntime as ort

    path = Path(path)
    providers = providers_for(device)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's notes about node placement are noise here
    if threads:
        opts.intra_op_num_threads = threads
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if not spinning:
        opts.add_session_config_entry(SPINNING, "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as exc:  # ORT raises its own exception types for broken or unsupported files
        raise UserError(f"{path}: ONNX Runtime cannot load it ({exc})") from None
    # The CUDA provider falls back to the CPU silently when its libraries are missing.
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError(
            f"{path}: the CUDA execution provider could not be initialised (CUDA/cuDNN libraries missing?)"
        )
    return session


class OnnxFunction:
    """An ONNX Runtime session as a function of (B,3,H,W) float32 arrays in [0,1]: float16 models are cast at
    the boundary, uint8 models (the INT8 export) get the image as 0-255 bytes (pixels.to_uint) and give it
    back through pixels.to_float. `native` and `run_native` skip that conversion (the timing path times a
    model on its own pixel type)."""

    def __init__(self, session):
        self.session = session
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name = inp.name
        self.input_type = PIXEL_TYPES.get(inp.type, "float32")
        self.output_type = PIXEL_TYPES.get(out.type, "float32")
        # The input's dimensions: numbers where fixed, names (or None) where free.
        self.input_shape = tuple(inp.shape)

    def native(self, x: np.ndarray) -> np.ndarray:
        """`x` (float in [0,1]) as the array the model takes."""
        if self.input_type == "uint8":
            return to_uint(x)
        return x.astype(np.dtype(self.input_type), copy=False)

    def run_native(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: arr})[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.run_native(self.native(x))
        if out.dtype == np.uint8:
            return to_float(out)
        return out.astype(np.float32, copy=False)
