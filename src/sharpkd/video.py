"""Video through PyAV (FFmpeg's libraries): what `sharpkd sharpen clip.mp4` and `sharpkd bench --video` run.

Kept: every frame FFmpeg can decode, at the input's exact size (odd sides too), with its timestamp (so
the time base, the frame rate and variable frame timing too); rotation (the display matrix); the colour
tags (range, matrix, primaries, transfer), used both ways in the RGB conversions; the audio and subtitle
streams, remuxed packet for packet (never re-encoded) where the output container can hold them (a note
names any it cannot, and every other stream). Video is encoded by `VideoOptions.codec` (libx264 unless
told) at its pixel format (`pixel_format`): 4:2:0 where both sides are even and the input is 4:2:0 (what
every player decodes), 4:4:4 where a side is odd (4:2:0 cannot hold an odd side, and padding would change
the size) or the input is 4:4:4 or RGB; 4:2:2 stays 4:2:2 where its width allows. Frames FFmpeg cannot
decode, or marks corrupt, are skipped and counted (`Report.lost`): never a silent cut.

Three threads, bounded queues between them (`_depth`: QUEUE_DEPTH items, fewer for large frames):
  reader   demux, decode (with FFmpeg's own threads), each frame to planar RGB (swscale), and on the CPU
           to the model's float input
  main     the model, on batches of frames (`ModelIO`): only the model, so it runs back to back
  writer   the model's planar RGB output (float32 on the CPU) -> the encoder's pixel format (swscale),
           encode, mux; the copied packets muxed
On a GPU the float conversions run on the device instead (`ModelIO`), so only bytes cross, and frames go
in batches (GPU_BATCH). Copied packets travel through the same queues, in file order. The first thread
that fails stops the others, and its error is raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from sharpkd.errors import UserError
from sharpkd.images import printable

# Output suffix -> FFmpeg muxer (given explicitly: the temporary name must not decide it).
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
DEFAULT_CODEC = "libx264"
# --crf when not given: "visually lossless" (the encoders' own defaults, 23 and 28, blur the detail we add).
DEFAULT_CRF = {"libx264": 18, "libx265": 20}
# --preset when not given and the model runs on the CPU, where the encoder takes CPU time from the model:
# the fastest (on 2 cores at 1080p, x264's ultrafast costs the INT8 student about a fifth of its speed,
# veryfast a third, medium more than half; the files are larger at the same crf). On a GPU: the encoder's.
CPU_PRESET = {"libx264": "ultrafast", "libx265": "ultrafast"}
# The option --crf sets, per encoder; these also get "b": "0" (constant quality, no bit-rate cap).
QUALITY_OPTION = {
    "libx264": "crf",
    "libx265": "crf",
    "libsvtav1": "crf",
    "libaom-av1": "crf",
    "libvpx-vp9": "crf",
    "h264_nvenc": "cq",
    "hevc_nvenc": "cq",
    "av1_nvenc": "cq",
}
UNCAPPED = {"libvpx-vp9", "h264_nvenc", "hevc_nvenc", "av1_nvenc"}
# Encoders that print banners to stderr themselves (not through FFmpeg's log): errors only.
QUIET = {"libx265": {"x265-params": "log-level=error"}}
QUIET_ENV = {"libsvtav1": ("SVT_LOG", "1")}
NVENC = "h264_nvenc"
WHOLE_FRAME = 3840 * 2160  # frames up to 4K go through the model whole; larger ones in LARGE_TILE tiles
LARGE_TILE = 1024
QUEUE_DEPTH = 8
QUEUE_BYTES = 256 * 2**20  # at most about this much float frame data waiting in each queue
GPU_BATCH = 4
COLOUR_TAGS = ("color_range", "colorspace", "color_primaries", "color_trc")
RGB_PLANES = (2, 0, 1)  # FFmpeg's planar RGB (gbrp) stores G, B, R
PLANAR = {np.dtype(np.uint8): "gbrp", np.dtype(np.float32): "gbrpf32le"}
# swscale on one thread: its slice threads cost more than they save at these sizes (4x the time on 2 cores).
SWS_THREADS = 1
_END = object()  # the last item of a queue


@dataclass(frozen=True)
class VideoOptions:
    """How the video stream is encoded; `batch`: frames per model call (0: GPU_BATCH on CUDA, else 1)."""

    codec: str = DEFAULT_CODEC
    crf: int | None = None
    preset: str | None = None
    batch: int = 0

    def encoder_options(self) -> dict[str, str]:
        """The encoder's AVOptions for --crf and --preset."""
        if self.codec in QUIET_ENV:
            os.environ.setdefault(*QUIET_ENV[self.codec])
        opts = dict(QUIET.get(self.codec, {}))
        if self.preset:
            opts["preset"] = self.preset
        crf = self.crf if self.crf is not None else DEFAULT_CRF.get(self.codec)
        if crf is None:
            return opts
        key = QUALITY_OPTION.get(self.codec)
        if key is None:
            raise UserError(
                f"--crf: no constant-quality option is known for {self.codec} "
                f"(known: {', '.join(QUALITY_OPTION)}); leave --crf out to use the encoder's default"
            )
        opts[key] = str(crf)
        if self.codec in UNCAPPED:
            opts["b"] = "0"
        return opts

    def on(self, device: str) -> VideoOptions:
        """These options for a model on `device`: the CPU preset (CPU_PRESET) where none is given."""
        if self.preset is None and str(device).startswith("cpu") and self.codec in CPU_PRESET:
            return dataclasses.replace(self, preset=CPU_PRESET[self.codec])
        return self

    def describe(self) -> str:
        opts = self.encoder_options()
        shown = {k: v for k, v in opts.items() if k in ("preset", "crf", "cq")}
        return " ".join([self.codec, *(f"{k} {v}" for k, v in shown.items())])


def check_options(opts: VideoOptions) -> None:
    """A clear UserError before any work when the encoder is unknown here, is not a video encoder, or
    cannot be opened with these options (a bad --preset, NVENC without an NVIDIA GPU)."""
    try:
        codec = av.Codec(opts.codec, "w")
    except av.codec.codec.UnknownCodecError:
        raise UserError(
            f"--codec {opts.codec}: this FFmpeg has no such encoder (e.g. libx264, libx265, libsvtav1, "
            f"{NVENC})"
        ) from None
    if codec.type != "video":
        raise UserError(f"--codec {opts.codec}: not a video encoder ({codec.type})")
    ctx = av.CodecContext.create(codec)  # opened at 256x256: NVENC refuses very small frames
    ctx.width, ctx.height, ctx.time_base, ctx.framerate = 256, 256, Fraction(1, 25), Fraction(25)
    ctx.pix_fmt = pixel_format(codec, av.VideoFormat("yuv420p"), 256, 256)
    ctx.options = opts.encoder_options()
    try:
        ctx.open()
    except (av.FFmpegError, ValueError) as exc:
        raise UserError(
            f"--codec {opts.codec}: cannot be opened with {opts.describe()} ({_why(exc)})"
        ) from None


def encoder_available(name: str) -> bool:
    """Whether encoder `name` opens here (NVENC needs an NVIDIA GPU and driver, not only FFmpeg's code)."""
    try:
        check_options(VideoOptions(codec=name))
    except UserError:
        return False
    return True


def _why(exc: BaseException) -> str:
    """FFmpeg's words, without the file name or call PyAV adds."""
    return getattr(exc, "strerror", None) or str(exc)


def _chroma(fmt) -> str:
    """'444', '422' or '420': the chroma subsampling of an FFmpeg pixel format (gray counts as 4:2:0)."""
    if fmt.is_rgb:
        return "444"
    if len(fmt.components) < 3:
        return "420"
    if fmt.chroma_width(64) == 64:
        return "444"
    return "422" if fmt.chroma_height(64) == 64 else "420"


def pixel_format(codec, source_format, width: int, height: int) -> str:
    """The encoder's pixel format for frames of this size decoded as `source_format` (module docstring)."""
    wanted = {"444": "yuv444p", "422": "yuv422p", "420": "yuv420p"}[_chroma(source_format)]
    if wanted == "yuv420p" and (width % 2 or height % 2) or wanted == "yuv422p" and width % 2:
        wanted = "yuv444p"  # the exact size, not a side cut or padded
    formats = [f.name for f in codec.video_formats or []]
    if not formats or wanted in formats:
        return wanted
    if "yuv444p" in formats:
        return "yuv444p"
    odd = width % 2 or height % 2
    if not odd and "yuv420p" in formats:
        return "yuv420p"
    why = f"keep the size {width}x{height}" if odd else "take planar YUV"
    raise UserError(
        f"{codec.name} cannot {why}: it encodes {', '.join(formats[:6])} only; use --codec libx264 "
        "(4:4:4 keeps any size)"
    )


@dataclass
class Report:
    """What became of one video."""

    frames: int = 0  # written
    lost: int = 0  # skipped: FFmpeg could not decode them, or marked them corrupt
    lost_at: list[float] = field(default_factory=list)  # when the first of them were (seconds)
    error: str = ""  # FFmpeg's first decoding error
    stopped: str = ""  # why reading ended before the end of the file, if it did
    listed: int = 0  # frames the container lists (0: it does not say)
    resized: int = 0  # frames of another size than the first, scaled to it (the encoder takes one size)
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # width, height
    rate: Fraction | None = None
    codec: str = ""
    pixel_format: str = ""
    seconds: float = 0.0

    def lose(self, when: float | None, why: str) -> None:
        self.lost += 1
        self.error = self.error or why
        if when is not None and len(self.lost_at) < 5:
            self.lost_at.append(when)

    @property
    def damaged(self) -> bool:
        return bool(self.lost or self.stopped)

    def problem(self) -> str:
        """What was lost, in one sentence ("" when nothing)."""
        parts = []
        if self.lost:
            at = ", ".join(f"{t:.2f} s" for t in self.lost_at) + (
                ", ..." if self.lost > len(self.lost_at) else ""
            )
            parts.append(
                f"{self.lost} frame(s) could not be decoded (damaged?) and are missing"
                + (f", at {at}" if at else "")
                + f" ({self.error})"
            )
        if self.stopped:
            parts.append(self.stopped)
        return "; ".join(parts)

    def summary(self) -> str:
        w, h = self.size
        fps = f" at {float(self.rate):g} fps" if self.rate else ""
        speed = self.frames / self.seconds if self.seconds else 0.0
        return f"{self.frames} frames, {w}x{h}{fps}, {self.codec} {self.pixel_format}, {speed:.1f} frames/s"


@dataclass
class _Frame:
    rgb: list[np.ndarray]  # the R, G, B planes as decoded, (H,W) uint8 each
    pts: int | None
    x: np.ndarray | None = None  # the model's input (ModelIO.prepare)
    y: np.ndarray | None = None  # the model's output for this frame (ModelIO.finish makes it uint8)


def _seconds(packet) -> float | None:
    ts = packet.pts if packet.pts is not None else packet.dts
    return float(ts * packet.time_base) if ts is not None and packet.time_base else None


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
    """The model between uint8 frames and its float tensors, with images.to_tensor / to_image's arithmetic
    (x / 255 in float32; clamp, x 255, round half to even): `prepare` one frame (reader thread), `run` a
    batch (main thread), `finish` one frame (writer thread). On the CPU the conversions are numpy in the
    reader and writer threads, beside the model; on a GPU they are torch on the device, in `run`."""

    def __init__(self, model, tile: int, overlap: int):
        self.model, self.tile, self.overlap = model, tile, overlap
        self.device = torch.device(getattr(model, "tile_device", None) or "cpu")
        self.on_host = self.device.type == "cpu"  # the conversions (ONNX Runtime takes host arrays)
        self.on_cpu = str(getattr(model, "device", "cpu")) == "cpu"  # the model's own work
        # Input buffers back from `run`, filled again: a fresh 25 MB array per 1080p frame cost 8x the
        # division itself in page faults.
        self.free: queue.SimpleQueue = queue.SimpleQueue()

    def prepare(self, rgb) -> np.ndarray:
        """R, G, B planes (a (3,H,W) uint8 array or three (H,W) ones) -> run's input: (3,H,W) float32 in
        [0,1] on the CPU, uint8 for a GPU."""
        if not self.on_host:
            return np.stack(rgb)
        shape = (3, *rgb[0].shape)
        try:
            x = self.free.get_nowait()
        except queue.Empty:
            x = np.empty(shape, np.float32)
        if x.shape != shape:
            x = np.empty(shape, np.float32)
        for c in range(3):
            np.divide(rgb[c], np.float32(255.0), out=x[c])
        return x

    def release(self, x: np.ndarray) -> None:
        """An input `run` is done with, for `prepare` to fill again."""
        if self.on_host:
            self.free.put(x)

    @torch.no_grad()
    def run(self, batch: list[np.ndarray]) -> np.ndarray:
        """Prepared frames -> the model's (B,3,H,W) output (float32 on the CPU, uint8 from a GPU)."""
        x = torch.from_numpy(batch[0][None] if len(batch) == 1 else np.stack(batch))
        if self.on_host:
            return self.model.apply(x, self.tile, self.overlap).numpy()
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        y = self.model.apply(x, self.tile, self.overlap)
        return y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()

    @staticmethod
    def finish(y: np.ndarray) -> np.ndarray:
        """One frame of run's output -> (3,H,W) uint8."""
        if y.dtype == np.uint8:
            return y
        y = y if y.flags.writeable else y.copy()
        np.multiply(y, np.float32(255.0), out=y)
        np.rint(y, out=y)
        np.clip(y, 0, 255, out=y)
        return y.astype(np.uint8)


SPINNING = "session.intra_op.allow_spinning"


def sharing_the_cpu(model):
    """The model with ONNX Runtime's CPU threads sleeping between runs instead of spinning (its session made
    again with the same options otherwise): in a video they share the CPU with the decoder and the encoder,
    and on 2 cores the spinning took about a fifth of each frame's CPU time from them. Any other model (a
    GPU session, torch) is returned as it is."""
    session = getattr(getattr(model, "fn", None), "session", None)
    if session is None or getattr(model, "device", "cpu") != "cpu":
        return model
    opts = session.get_session_options()
    with contextlib.suppress(RuntimeError):  # raised where the entry was never set
        if opts.get_session_config_entry(SPINNING) == "0":
            return model
    import onnxruntime as ort

    from sharpkd.runtime import OnnxFunction

    opts.add_session_config_entry(SPINNING, "0")
    again = ort.InferenceSession(str(model.path), opts, providers=session.get_providers())
    return dataclasses.replace(model, fn=OnnxFunction(again))


def sharpen_frames(model, rgb: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """(B,3,H,W) uint8 frames -> the model's (B,3,H,W) uint8, in one call (ModelIO's steps in a row)."""
    io = ModelIO(model, tile, overlap)
    return np.stack([io.finish(y) for y in io.run([io.prepare(f) for f in rgb])])


def frame_tiling(tile: int | None, width: int, height: int) -> int:
    """The tile a frame goes through the model in: `tile` when given, else the whole frame up to 4K."""
    if tile:
        return tile
    return max(width, height) if width * height <= WHOLE_FRAME else LARGE_TILE


class _Reader:
    """The input's packets in file order: frames of the video stream decoded to `_Frame`s, the other streams'
    packets as they are. What cannot be decoded is counted in the report."""

    def __init__(self, container, stream, report: Report):
        self.container, self.stream, self.report = container, stream, report
        self.first = None  # the first decoded av.VideoFrame (its size, rotation and colour tags)

    def items(self) -> Iterator[object]:
        for packet in self._packets():
            if packet.stream.index == self.stream.index:
                yield from self._decode(packet)
            elif packet.dts is not None:
                yield packet
        if self.report.stopped:  # the demuxer's end-of-file flush did not come
            yield from self._decode(None)

    def _packets(self) -> Iterator[object]:
        try:
            yield from self.container.demux()
        except av.FFmpegError as exc:
            self.report.stopped = f"reading stopped, the rest of the file is lost ({_why(exc)})"

    def _decode(self, packet) -> Iterator[_Frame]:
        try:
            frames = self.stream.decode(packet)
        except av.FFmpegError as exc:
            if packet is not None and packet.size:
                self.report.lose(_seconds(packet), _why(exc))
            return
        for frame in frames:
            if frame.is_corrupt:
                self.report.lose(frame.time, "FFmpeg marked the frame corrupt")
                continue
            if self.first is None:
                self.first = frame
                bits = frame.format.components[0].bits
                if bits > 8:
                    self.report.notes.append(f"{bits}-bit input written as 8-bit")
            w, h = self.first.width, self.first.height
            self.report.resized += (frame.width, frame.height) != (w, h)
            yield _Frame(rgb_planes(frame, w, h), frame.pts)


def _rate(stream, report: Report) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        report.notes.append("frame rate unknown, written at 25 fps")
        return Fraction(25)
    return Fraction(rate)


class _Encoder:
    """The output's video stream: planar RGB frames in, encoded packets muxed (on the writer thread)."""

    def __init__(self, container, opts: VideoOptions, vin, first, width: int, rate: Fraction):
        codec = av.Codec(opts.codec, "w")
        self.container = container
        self.stream = st = container.add_stream(opts.codec, rate=rate)
        st.width, st.height = width, first.height
        st.pix_fmt = pixel_format(codec, first.format, width, first.height)
        tb = vin.time_base or 1 / rate
        st.time_base = st.codec_context.time_base = tb
        self.colours = {k: getattr(first, k) for k in COLOUR_TAGS}
        for k, v in self.colours.items():
            setattr(st.codec_context, k, v)
        if vin.sample_aspect_ratio:
            st.codec_context.sample_aspect_ratio = vin.sample_aspect_ratio
        if first.rotation:
            st.set_display_rotation(first.rotation)
        st.options = opts.encoder_options()
        st.metadata.update({k: v for k, v in vin.metadata.items() if k in ("language", "title")})
        self.step = max(1, round(1 / (rate * tb)))  # one frame in time-base units
        self.last: int | None = None
        self.planar: dict = {}  # the RGB frame each dtype is copied into, kept from frame to frame

    def write(self, rgb: np.ndarray, pts: int | None) -> None:
        """One frame, (3,H,W) uint8 or float32 RGB (rgb_frame)."""
        self.planar[rgb.dtype] = src = rgb_frame(rgb, self.planar.get(rgb.dtype))
        frame = src.reformat(
            format=self.stream.pix_fmt,
            threads=SWS_THREADS,
            dst_colorspace=self.colours["colorspace"],
            dst_color_range=self.colours["color_range"],
        )
        for k, v in self.colours.items():
            setattr(frame, k, v)
        # The input's timestamps; one frame on from the last where it has none or repeats one.
        if pts is None or (self.last is not None and pts <= self.last):
            pts = 0 if self.last is None else self.last + self.step
        self.last = frame.pts = pts
        frame.time_base = self.stream.codec_context.time_base
        self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        self.container.mux(self.stream.encode(None))


@dataclass
class _Source:
    """What an output is made from: the input container, its video stream, its first frame, its frame rate."""

    container: object
    stream: object
    first: object
    rate: Fraction


class _Output:
    """One output file: the sharpened video stream and, unless `video_only`, the copied streams."""

    def __init__(self, path: Path, suffix: str, src: _Source, opts: VideoOptions, width: int, report: Report,
                 video_only: bool = False):  # fmt: skip
        self.container = av.open(str(path), "w", format=CONTAINERS[suffix])
        try:
            self.container.metadata.update(_global_metadata(src.container))
            self.video = _Encoder(self.container, opts, src.stream, src.first, width, src.rate)
            self.copied = (
                {} if video_only else _copy_streams(src.container, src.stream, self.container, suffix, report)
            )
        except BaseException:
            self.container.close()
            raise

    def write(self, rgb: np.ndarray, pts: int | None) -> None:
        self.video.write(rgb, pts)

    def copy(self, packet) -> None:
        out = self.copied.get(packet.stream.index)
        if out is not None:
            packet.stream = out
            self.container.mux(packet)

    def finish(self) -> None:
        self.video.finish()

    def close(self) -> None:
        self.container.close()


@contextlib.contextmanager
def _closed(output: _Output) -> Iterator[_Output]:
    """Closes `output` on the way out; after a failure, an error in closing does not hide the first one."""
    try:
        yield output
    except BaseException:
        with contextlib.suppress(Exception):
            output.close()
        raise
    output.close()


def _global_metadata(inp) -> dict[str, str]:
    """The input's container tags (title, creation time...), less those the muxer writes itself."""
    own = {"major_brand", "minor_version", "compatible_brands", "encoder"}
    return {k: v for k, v in inp.metadata.items() if k not in own}


def _copy_streams(inp, vin, out, suffix: str, report: Report) -> dict[int, object]:
    """Output streams for the input's audio and subtitle streams, by input index; notes for the others."""
    copied = {}
    for s in inp.streams:
        if s.index == vin.index:
            continue
        name = s.codec_context.codec.canonical_name if s.codec_context is not None else (s.name or "?")
        if s.type not in ("audio", "subtitle"):
            report.notes.append(f"{s.type} stream #{s.index} ({name}) not kept")
            continue
        try:
            o = out.add_stream_from_template(s)
        except ValueError:  # the muxer cannot hold this codec
            report.notes.append(
                f"{s.type} stream #{s.index} ({name}) not kept: {suffix} cannot hold it (.mkv can)"
            )
            continue
        o.metadata.update(s.metadata)
        o.disposition = s.disposition
        copied[s.index] = o
    kinds = [inp.streams[i].type for i in copied]
    for kind in ("audio", "subtitle"):
        if kinds.count(kind):
            report.notes.append(f"{kinds.count(kind)} {kind} stream(s) copied")
    return copied


class _Stopped(Exception):
    """Another thread failed: this one gives up quietly (that thread's error is the one raised)."""


class _Pipe:
    """Bounded queues between threads, that stop waiting as soon as any thread failed."""

    def __init__(self):
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def put(self, q: queue.Queue, item) -> None:
        while not self.failed.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.1)
                return
        raise _Stopped

    def drain(self, q: queue.Queue) -> Iterator[object]:
        """The items of `q` up to its _END."""
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if self.failed.is_set():
                    raise _Stopped from None
                continue
            if item is _END:
                return
            yield item

    def spawn(self, fn: Callable, *args) -> None:
        def run():
            with contextlib.suppress(_Stopped):
                try:
                    fn(*args)
                except BaseException as exc:
                    self.fail(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, _Stopped):
            self.errors.append(exc)
        self.failed.set()

    def join(self) -> None:
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


# The nice value of the reader and writer threads when the model runs on the CPU. In one series on 2 cores
# (1080p, libx264 ultrafast), end to end against the model alone: 0.67 at 0, 0.69 as SCHED_BATCH, 0.80 at 5,
# 0.83 at 10, 0.76 at 19; 10 rather than 19, which starves them behind any other busy program.
BEHIND_THE_MODEL = 10


def _behind_the_model(io: ModelIO) -> None:
    """The calling thread (reader, writer) and the threads it starts (the encoder's) at a lower priority
    (BEHIND_THE_MODEL) when the model runs on the CPU: the model's threads then run nearly as if alone and
    these fill the time they leave, instead of stalling them mid-layer (ONNX Runtime's threads wait for
    each other). Linux only, where a nice value is per thread."""
    if io.on_cpu and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BEHIND_THE_MODEL)


@dataclass
class _Run:
    """One video through the three threads (module docstring)."""

    io: ModelIO
    batch: int
    out: _Output
    preview: _Output | None
    report: Report
    on_frame: Callable[[int, int | None], None] | None

    def run(self, head: list, rest: Iterator[object], depth: int) -> None:
        pipe = _Pipe()
        q_in: queue.Queue = queue.Queue(depth)
        q_out: queue.Queue = queue.Queue(depth)
        pipe.spawn(self._read, pipe, rest, q_in)
        pipe.spawn(self._write, pipe, q_out)
        try:
            self._infer(pipe, itertools.chain(self._prepared(head), pipe.drain(q_in)), q_out)
        except BaseException as exc:  # Ctrl-C included: the other threads stop too
            pipe.fail(exc)
        pipe.join()

    def _prepared(self, items: Iterable[object]) -> Iterator[object]:
        for item in items:
            if isinstance(item, _Frame):
                item.x = self.io.prepare(item.rgb)
            yield item

    def _read(self, pipe: _Pipe, items: Iterable[object], q_in: queue.Queue) -> None:
        _behind_the_model(self.io)
        for item in self._prepared(items):
            pipe.put(q_in, item)
        pipe.put(q_in, _END)

    def _infer(self, pipe: _Pipe, items: Iterable[object], q_out: queue.Queue) -> None:
        batch: list[_Frame] = []
        for item in items:
            if not isinstance(item, _Frame):
                pipe.put(q_out, item)
                continue
            batch.append(item)
            if len(batch) == self.batch:
                self._sharpen_batch(pipe, batch, q_out)
                batch = []
        if batch:
            self._sharpen_batch(pipe, batch, q_out)
        pipe.put(q_out, _END)

    def _sharpen_batch(self, pipe: _Pipe, batch: list[_Frame], q_out: queue.Queue) -> None:
        out = self.io.run([f.x for f in batch])
        for f, y in zip(batch, out, strict=True):
            self.io.release(f.x)
            f.x, f.y = None, y
            pipe.put(q_out, f)

    def _write(self, pipe: _Pipe, q_out: queue.Queue) -> None:
        _behind_the_model(self.io)
        for item in pipe.drain(q_out):
            if not isinstance(item, _Frame):
                self.out.copy(item)
                continue
            # The model's float output goes to swscale as it is (one rounding, into YUV); the preview's
            # two halves meet in uint8.
            self.out.write(item.y, item.pts)
            if self.preview is not None:
                self.preview.write(
                    np.concatenate([np.stack(item.rgb), self.io.finish(item.y)], axis=2), item.pts
                )
            self.report.frames += 1
            if self.on_frame:
                self.on_frame(self.report.frames, self.report.listed or None)
        self.out.finish()
        if self.preview is not None:
            self.preview.finish()


def _open_input(path: Path):
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UserError(f"{printable(path)}: FFmpeg cannot open this video ({_why(exc)})") from None


def _video_stream(inp, path: Path, report: Report, model_on_cpu: bool):
    """The video stream to sharpen (the first). Decoded with FFmpeg's frame threads when the model runs on
    a GPU; with the model on the CPU, on the reader's own thread (one thread: the model is far slower than
    that decoder, and frame threads, started on the main thread, would run at the model's priority)."""
    if not inp.streams.video:
        raise UserError(f"{printable(path)}: no video stream")
    vin = inp.streams.video[0]
    if model_on_cpu:
        vin.thread_count = 1
    else:
        vin.thread_type = "AUTO"
    report.listed = vin.frames or _estimated_frames(vin)
    for other in inp.streams.video[1:]:
        report.notes.append(f"video stream #{other.index} not kept (the first one is sharpened)")
    return vin


def _estimated_frames(vin) -> int:
    """The frame count from the stream's duration and rate (for the progress bar), 0 when unknown."""
    if vin.duration and vin.time_base and vin.average_rate:
        return round(vin.duration * vin.time_base * vin.average_rate)
    return 0


def _head(items: Iterator[object], reader: _Reader, path: Path) -> list:
    """The items up to the first decoded frame (the output is opened from it)."""
    head = []
    for item in items:
        head.append(item)
        if isinstance(item, _Frame):
            return head
    why = f": {reader.report.error or reader.report.stopped}" if reader.report.damaged else ""
    raise UserError(f"{printable(path)}: no video frame could be decoded{why}")


def sharpen_video(
    model,
    src: Path,
    dst: Path,
    preview: Path | None = None,
    opts: VideoOptions | None = None,
    tile: int | None = None,
    overlap: int = 16,
    on_frame: Callable[[int, int | None], None] | None = None,
    suffix: str | None = None,
) -> Report:
    """Sharpen the first video stream of `src` into `dst` (and the side-by-side `preview`: input | sharpened,
    video only); `suffix` names the container when `dst` is a temporary name (default: dst's suffix).
    `tile` None: whole frames up to 4K (frame_tiling). Damaged frames are skipped and reported, not raised:
    the caller decides (Report.damaged)."""
    opts = (opts or VideoOptions()).on(getattr(model, "device", "cpu"))
    suffix = (suffix or dst.suffix).lower()
    report = Report()
    t0 = time.perf_counter()
    model = sharing_the_cpu(model)
    with contextlib.closing(_open_input(src)) as inp, contextlib.ExitStack() as stack:
        vin = _video_stream(inp, src, report, str(getattr(model, "device", "cpu")) == "cpu")
        reader = _Reader(inp, vin, report)
        items = reader.items()
        head = _head(items, reader, src)
        source = _Source(inp, vin, reader.first, _rate(vin, report))
        w, h = source.first.width, source.first.height
        out = stack.enter_context(_closed(_Output(dst, suffix, source, opts, w, report)))
        pout = None
        if preview is not None:
            pout = _Output(preview, suffix, source, opts, 2 * w, report, video_only=True)
            stack.enter_context(_closed(pout))
        tiling = frame_tiling(tile, w, h)
        run = _Run(ModelIO(model, tiling, overlap), _batch(model, opts), out, pout, report, on_frame)
        run.run(head, items, _depth(w, h))
        report.size, report.rate, report.codec = (w, h), source.rate, opts.codec
        report.pixel_format = out.video.stream.pix_fmt
        if report.resized:
            report.notes.append(f"{report.resized} frame(s) of another size scaled to {w}x{h}")
        found = report.frames + report.lost
        if vin.frames and found < vin.frames and not report.stopped:
            report.notes.append(f"the container lists {vin.frames} frames, {found} were found")
    report.seconds = time.perf_counter() - t0
    if tiling < max(w, h):
        report.notes.append(f"tiled {tiling}")
    return report


def _depth(width: int, height: int) -> int:
    """Items per queue: QUEUE_DEPTH, fewer where frames are large (QUEUE_BYTES of float frames at most)."""
    return int(np.clip(QUEUE_BYTES // (12 * width * height), 3, QUEUE_DEPTH))


def _batch(model, opts: VideoOptions) -> int:
    if opts.batch:
        return opts.batch
    return GPU_BATCH if str(getattr(model, "device", "cpu")).startswith("cuda") else 1


def write_clip(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int = 30,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
    audio: bool = False,
) -> Path:
    """A clip of HxWx3 uint8 RGB `frames` (tests, the benchmark), in `pix_fmt` (default: yuv420p, yuv444p
    for an odd size); `audio`: with a 440 Hz stereo AAC track as long as the video, interleaved with it."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=fps)
        v.height, v.width = first.shape[:2]
        v.pix_fmt = pix_fmt or ("yuv444p" if v.width % 2 or v.height % 2 else "yuv420p")
        v.options = options or {}
        tone = _Tone(out) if audio else None
        for i, rgb in enumerate(itertools.chain([first], frames)):
            out.mux(v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
            if tone is not None:
                tone.until((i + 1) / fps)
        out.mux(v.encode(None))
        if tone is not None:
            tone.finish()
    return path


class _Tone:
    """A 440 Hz stereo AAC stream, written in 1024-sample frames."""

    def __init__(self, out, rate: int = 44100):
        self.out, self.rate, self.done = out, rate, 0
        self.stream = out.add_stream("aac", rate=rate)
        self.stream.layout = "stereo"

    def until(self, seconds: float) -> None:
        while self.done + 1024 <= seconds * self.rate:
            t = np.arange(self.done, self.done + 1024) / self.rate
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = self.rate, self.done
            self.out.mux(self.stream.encode(frame))
            self.done += 1024

    def finish(self) -> None:
        self.out.mux(self.stream.encode(None))
