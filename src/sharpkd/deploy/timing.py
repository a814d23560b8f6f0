"""The one timing path: every speed figure (evaluate, export, `sharpkd bench`, scripts/sweep_table.py) is
measured and named here.

- Sizes are (height, width), like the arrays; `FRAME_1080P` is the reference frame.
- A figure is "frame in, frame out": a frame in host memory goes through the model and comes back to
  host memory, in the model's own pixel type (float32; uint8 for the INT8 export, as video frames are
  decoded and encoded); one untimed warm-up, then the median of `repeats` (`time_ms`). A `Target` builds
  what it times (an ONNX Runtime session, say) only when it is timed and drops it after, so one is alive
  at a time: an idle session's threads keep spinning and would slow the one being timed.
- Keys: `speed.<model>.<runtime>_<device>[_<precision>].<size>.{ms,fps,reason}`, e.g.
  `speed.student.onnxruntime_cpu_int8.1080p.ms` (`speed_figures`; no precision suffix for fp32).
- Torch targets (the pipeline's eager student, its teacher) are made in sharpkd.torch_timing.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharpkd.deploy.sessions import OnnxFunction, ort_session

FRAME_1080P = (1080, 1920)  # (height, width)
SIZES = {"720p": (720, 1280), "1080p": FRAME_1080P, "4k": (2160, 3840), "2160p": (2160, 3840)}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms after `warmup` untimed calls (fn must end on the host, so no sync is needed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def size_label(size: tuple[int, int]) -> str:
    """(height, width) -> '1080p' for the named sizes, else 'WxH' (how sizes are written on a command line)."""
    named = {hw: label for label, hw in reversed(SIZES.items())}
    return named.get(tuple(size), f"{size[1]}x{size[0]}")


def figure_name(model: str, runtime: str, device: str, precision: str = "fp32") -> str:
    """e.g. student.onnxruntime_cpu, student.torch_cuda_fp16, teacher.torch_cpu, bicubic.resize_cpu."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    return f"{model}.{runtime}_{device}{suffix}"


def speed_key(name: str, size: str | tuple[int, int] = FRAME_1080P, field: str = "ms") -> str:
    """The flat key of one value of a figure: `speed.<name>.<size>.<field>` (field: ms, fps or reason);
    `size` is a label ('1080p', '64x48') or (height, width)."""
    label = size if isinstance(size, str) else size_label(size)
    return f"speed.{name}.{label}.{field}"


def speed_figures(
    name: str, size: str | tuple[int, int], ms: float | None, reason: str | None = None
) -> dict:
    """The keys of one figure (`speed_key`): ms and fps, or None for both and a reason when not timed."""
    if ms is None:
        return {
            speed_key(name, size, f): v
            for f, v in (("ms", None), ("fps", None), ("reason", reason or "not timed"))
        }
    return {speed_key(name, size, "ms"): round(ms, 3), speed_key(name, size, "fps"): round(1000.0 / ms, 2)}


def frame(size: tuple[int, int] = FRAME_1080P, seed: int = 0) -> np.ndarray:
    """A (1,3,H,W) float32 frame in [0,1] in host memory (its content does not change a timing)."""
    return np.random.default_rng(seed).random((1, 3, *size), dtype=np.float32)


@dataclass
class Target:
    """One thing to time: `make(x)` returns a zero-argument callable running frame `x` ((1,3,H,W) float32)."""

    model: str  # student | teacher | bicubic
    runtime: str  # torch | torchscript | onnxruntime | resize | video
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | int8
    make: Callable[[np.ndarray], Callable[[], object]]
    how: str = "full frame"
    warmup: int = 1

    @property
    def name(self) -> str:
        return figure_name(self.model, self.runtime, self.device, self.precision)


def time_target(target: Target, x: np.ndarray, repeats: int) -> float:
    """ms per frame `x` of `target`; what `make` built is released before the next target is built."""
    fn = target.make(x)
    try:
        return time_ms(fn, repeats, target.warmup)
    finally:
        del fn


def measure(targets: list[Target], repeats: int, size: tuple[int, int] = FRAME_1080P) -> dict:
    """The figures (`speed_figures`) of every target on one frame of `size`, timed one after another."""
    x = frame(size)
    out: dict = {}
    for t in targets:
        out.update(speed_figures(t.name, size, time_target(t, x, repeats)))
    return out


def onnx_target(path: str | Path, device: str, threads: int) -> Target:
    """The timing target of an ONNX student: a fresh session per timing, released after it.

    The file is opened once now, so a bad one fails before any timing; its precision comes from the
    metadata export.py and quantize.py write, else from its input type. The frame goes in and comes out
    in the model's own pixel type (float32, float16, or uint8 for the INT8 export, as a video frame is
    decoded and encoded): the conversion from float32 is not timed.
    """
    path = Path(path)
    fn = OnnxFunction(ort_session(path, device, threads))
    recorded = fn.session.get_modelmeta().custom_metadata_map.get("sharpkd.precision")
    precision = recorded or ("fp16" if fn.input_type == "float16" else "fp32")
    del fn

    def make(x: np.ndarray):
        session = OnnxFunction(ort_session(path, device, threads))
        arr = session.native(x)
        return lambda: session.run_native(arr)

    return Target("student", "onnxruntime", device, precision, make)
