"""The typed model descriptor: what sharpen, video, serving and bench know of a loaded model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sharpkd.deploy.pixels import to_float, to_uint
from sharpkd.deploy.sessions import OnnxFunction, ort_session
from sharpkd.deploy.tiling import tiled_apply
from sharpkd.errors import UserError

PixelType = Literal["float32", "float16", "uint8"]
# A multiple of every supported scale (2, 3, 4): tiles whose origins are multiples of
# it never shift a student's pixel-unshuffle grid, whatever its scale.
ANY_SCALE_GRID = 12
# The side of the test image a loaded model is run on (rounded up to its grid).
PROBE_SIDE = 32
# The scales a model may declare (its ONNX metadata, its TorchScript `scale`): the test image and every tile
# grow with it (a scale of 100000 would have the load check allocate 240 GB).
MAX_SCALE = 8
# The test image's pixels are uniform in [0, 1]; a sharpening model's output keeps their mean (0.5) and
# spans about as much (more where it sharpens hard: noise is its worst case). An output averaging above
# PROBE_MEAN (0-255 values, read as 0-1) or spanning under PROBE_SPAN (0-1 values given as bytes, read as
# 0-255) is in the wrong range: every image would come out white or black.
PROBE_MEAN, PROBE_SPAN = 2.0, 0.05


@dataclass(frozen=True)
class Verification:
    """How the file was checked: its sha256 and where it came from."""

    sha256: str
    source: str  # "given", "this checkout's export", "zoo:NAME, ...", "models:/<name>/<version> (MLflow registry)"


@dataclass(frozen=True)
class Model:
    """A loaded sharpening model. `run` maps (B,3,H,W) float32 in [0,1] (RGB, NCHW) to the same shape;
    `apply` runs it tiled. The model's own pixel types are `input_type` / `output_type` (the INT8 export
    takes and gives uint8; `run` converts at the boundary, pixels.to_uint / to_float)."""

    path: Path
    kind: str  # onnx | torchscript | checkpoint
    scale: int | None  # the student's upscale inside (None: the file does not say)
    tile_grid: int  # tile origins are multiples of this (the student's scale, else ANY_SCALE_GRID)
    input_type: PixelType
    output_type: PixelType
    device: str  # cpu | cuda
    providers: tuple[str, ...]  # ONNX Runtime's execution providers (torch: ())
    threads: int  # ONNX Runtime intra-op threads (0: its default)
    spinning: bool  # ONNX Runtime's threads busy-wait between runs
    verification: Verification
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)
    layout: str = "NCHW RGB"

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def apply(self, x: np.ndarray, tile: int, overlap: int, what: str | Path | None = None) -> np.ndarray:
        """(B,3,H,W) float32 -> (B,3,H,W) float32, tile by tile. A tile whose output is not its input's size
        is a UserError; with `what` (the image's name) so is a non-finite output (not checked per video
        frame: a pass over a 1080p frame costs ~12 ms; the test at load did it once)."""

        def checked(t: np.ndarray) -> np.ndarray:
            y = self.run(t)
            self._refuse(_size_problem(t, y))
            return y

        out = tiled_apply(checked, x, scale=1, tile=tile, overlap=overlap, align=self.tile_grid)
        if what is not None and not np.isfinite(out.sum()):
            self._refuse(f"its output on {what} holds NaN or infinite values")
        return out

    @property
    def takes_bytes(self) -> bool:
        """Whether the model's own pixels are uint8 both ways (the INT8 export), so 8-bit frames can go
        through it with no float conversion (`run_bytes`)."""
        return self.input_type == self.output_type == "uint8" and hasattr(self.run, "run_native")

    def run_bytes(self, x: np.ndarray) -> np.ndarray:
        """(B,3,H,W) uint8 -> (B,3,H,W) uint8, one call, untiled (a video frame whole). A uint8 model gets the
        bytes as they are: the float round trip `run` makes costs more CPU than a fast student itself at
        1080p. Any other model converts at the boundary (pixels.to_float / to_uint)."""
        y = self.run.run_native(x) if self.takes_bytes else to_uint(self.run(to_float(x)), in_place=True)
        self._refuse(_size_problem(x, y))
        return y

    def _refuse(self, problem: str | None) -> None:
        if problem:
            raise UserError(f"{self.path}: not a sharpening model: {problem}; nothing was written")

    def check_outputs(self) -> None:
        """Run once on a small test image: a UserError naming the file when the output is not the input's
        size, not finite, not in the input's 0-1 range (PROBE_MEAN, PROBE_SPAN), or cannot be computed."""
        side = -(-PROBE_SIDE // self.tile_grid) * self.tile_grid
        h, w = side, side + self.tile_grid
        x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
        try:
            y = self.run(x)
        except Exception as exc:  # whatever the runtime raises (shape errors, missing ops): one line
            raise UserError(
                f"{self.path}: the model fails on a {h}x{w} test image ({first_line(exc)})"
            ) from None
        self._refuse(_size_problem(x, y))
        if not np.isfinite(y).all():
            self._refuse(f"its output on a {h}x{w} test image holds NaN or infinite values")
        low, high = float(y.min()), float(y.max())
        if float(y.mean()) > PROBE_MEAN or high - low < PROBE_SPAN:
            self._refuse(
                f"its output on a {h}x{w} test image of 0-1 pixels spans {low:.3g} to {high:.3g}, not 0-1 "
                f"(it takes {self.input_type} and gives {self.output_type}: 0-255 values on one side only?)"
            )

    def with_session(self, threads: int | None = None, spinning: bool | None = None) -> Model:
        """This ONNX model in a new session with other options (the same model for any other kind)."""
        if self.kind != "onnx":
            return self
        threads = self.threads if threads is None else threads
        spinning = self.spinning if spinning is None else spinning
        if (threads, spinning) == (self.threads, self.spinning):
            return self
        fn = OnnxFunction(ort_session(self.path, self.device, threads, spinning=spinning))
        return dataclasses.replace(self, run=fn, threads=threads, spinning=spinning)

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {self.device}; {self.verification.source})"


def _size_problem(x: np.ndarray, y) -> str | None:
    """Why `y` is not a sharpening model's output for input `x` (None: it has x's shape)."""
    shape = tuple(getattr(y, "shape", ()))
    if shape == tuple(x.shape):
        return None
    got = "x".join(map(str, shape)) if shape else f"a {type(y).__name__}, not an array"
    return f"a {'x'.join(map(str, x.shape))} input gives {got} (a sharpening model keeps the size)"


def model_scale(path: Path, value: object, where: str) -> int | None:
    """The scale a model declares (`where`: its metadata key or attribute), None when it declares none; a
    UserError naming the model when it is not a whole number from 1 to MAX_SCALE."""
    if value is None:
        return None
    text = str(value).strip()
    if text.isdecimal() and 1 <= int(text) <= MAX_SCALE:
        return int(text)
    raise UserError(
        f"{path}: its {where} = {text[:40]!r} is not a scale (a whole number from 1 to {MAX_SCALE}, "
        "as `dvc repro export` writes it)"
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
