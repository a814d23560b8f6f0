"""Video frames as pixel planes, and the model between uint8 frames and its input (`ModelIO`).

A decoded frame becomes its R, G and B planes through swscale (`rgb_planes`), with the frame's own colour
matrix and range; the model's output goes back to swscale as it is (`rgb_frame`): the INT8 model's bytes,
or a float model's float32, then rounded once, into YUV. The conversions are pixels.to_float / to_uint, the
ones image files use.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import av
import numpy as np

from sharpkd.deploy.models import Model
from sharpkd.deploy.pixels import to_float, to_uint

RGB_PLANES = (2, 0, 1)  # FFmpeg's planar RGB (gbrp) stores G, B, R
PLANAR = {np.dtype(np.uint8): "gbrp", np.dtype(np.float32): "gbrpf32le"}
# swscale on one thread: its slice threads cost more than they save at these sizes (4x the time on 2 cores).
SWS_THREADS = 1


@dataclass
class Frame:
    """One decoded frame on its way through the threads."""

    rgb: list[np.ndarray]  # the R, G, B planes as decoded, (H,W) uint8 each
    pts: int | None
    x: np.ndarray | None = None  # the model's input (ModelIO.prepare)
    y: np.ndarray | None = None  # the model's float output for this frame


def _plane(plane, width: int, height: int, dtype=np.uint8) -> np.ndarray:
    """One plane of a frame as an (H,W) view (FFmpeg pads its rows to `line_size` bytes)."""
    step = plane.line_size // np.dtype(dtype).itemsize
    return np.frombuffer(plane, dtype).reshape(height, step)[:, :width]


def rgb_planes(frame, width: int, height: int) -> list[np.ndarray]:
    """A decoded frame as its R, G and B planes, (H,W) uint8 views, at (width, height): swscale with the
    frame's own colour matrix and range (the values rgb24 gives, with nothing interleaved to transpose)."""
    g = frame.reformat(width=width, height=height, format="gbrp", threads=SWS_THREADS)
    return [_plane(g.planes[i], width, height) for i in RGB_PLANES]


def rgb_frame(rgb: np.ndarray, frame=None):
    """(3,H,W) RGB, uint8 or float32 (in [0,1]; swscale clips and rounds it) -> a planar RGB av.VideoFrame;
    `frame`: such a frame, of the same size and type, to fill again (a fresh 25 MB buffer per 1080p
    frame costs more in page faults than the copy)."""
    _, h, w = rgb.shape
    if frame is None:
        frame = av.VideoFrame(w, h, PLANAR[rgb.dtype])
    for src, i in zip(rgb, RGB_PLANES, strict=True):
        _plane(frame.planes[i], w, h, rgb.dtype)[...] = src
    return frame


class ModelIO:
    """The model between uint8 frames and its arrays: `prepare` one frame (reader thread), `run` a batch (main
    thread), `finish` one frame (writer thread), so the conversions run beside the model. A uint8 model (the
    INT8 export) on whole frames gets the frames' bytes and gives bytes back (`bytes`): no float array is
    made at all. Any other model, or a frame in tiles, gets float32 in [0,1]."""

    def __init__(self, model: Model, tile: int, overlap: int):
        self.model, self.tile, self.overlap = model, tile, overlap
        self.on_cpu = model.on_cpu  # the model's own work (the reader and writer then yield to it)
        self.bytes = model.takes_bytes
        # Input buffers back from `run`, filled again: a fresh 25 MB array per 1080p frame cost 8x the
        # division itself in page faults.
        self.free: queue.SimpleQueue = queue.SimpleQueue()

    def prepare(self, rgb) -> np.ndarray:
        """R, G, B planes (a (3,H,W) uint8 array or three (H,W) ones) -> run's input: (3,H,W), uint8 for a
        uint8 model on whole frames (`bytes`), else float32 in [0,1]."""
        shape = (3, *rgb[0].shape)
        whole = self.bytes and max(shape[1:]) <= self.tile
        dtype = np.uint8 if whole else np.float32
        try:
            x = self.free.get_nowait()
        except queue.Empty:
            x = np.empty(shape, dtype)
        if x.shape != shape or x.dtype != dtype:
            x = np.empty(shape, dtype)
        for c in range(3):
            if whole:
                x[c] = rgb[c]
            else:
                to_float(rgb[c], out=x[c])
        return x

    def release(self, x: np.ndarray) -> None:
        """An input `run` is done with, for `prepare` to fill again."""
        self.free.put(x)

    def run(self, batch: list[np.ndarray]) -> np.ndarray:
        """Prepared frames -> the model's (B,3,H,W) output: uint8 from uint8 input, else float32."""
        x = batch[0][None] if len(batch) == 1 else np.stack(batch)
        if x.dtype == np.uint8:
            return self.model.run_bytes(x)
        return self.model.apply(x, self.tile, self.overlap)

    @staticmethod
    def finish(y: np.ndarray) -> np.ndarray:
        """One frame of run's output -> (3,H,W) uint8 (a float y is used as scratch space)."""
        return y if y.dtype == np.uint8 else to_uint(y, 8, in_place=True)


def sharpen_frames(model: Model, rgb: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """(B,3,H,W) uint8 frames -> the model's (B,3,H,W) uint8, in one call (ModelIO's steps in a row)."""
    io = ModelIO(model, tile, overlap)
    return np.stack([io.finish(y) for y in io.run([io.prepare(f) for f in rgb])])
