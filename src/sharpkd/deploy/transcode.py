"""Video through PyAV (FFmpeg's libraries): what `sharpkd sharpen clip.mp4` and `sharpkd bench --video` run.

Kept: every frame FFmpeg can decode, at the input's exact size (odd sides too), with its timestamp (so
the time base, the frame rate and variable frame timing too); rotation (the display matrix); the colour
tags (range, matrix, primaries, transfer), used both ways in the RGB conversions; the audio and subtitle
streams, remuxed packet for packet (never re-encoded) where the output container can hold them (a note
names any it cannot, and every other stream). The encoder and its pixel format: deploy/encoding.py; the
frames' planes and the model's input: deploy/frames.py; the three threads: deploy/threads.py. Frames
FFmpeg cannot decode, or marks corrupt, are skipped and counted (`Report.lost`): never a silent cut.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from sharpkd.deploy.encoding import CONTAINERS, VideoOptions, ffmpeg_why, pixel_format
from sharpkd.deploy.frames import SWS_THREADS, Frame, ModelIO, rgb_frame, rgb_planes
from sharpkd.deploy.images import printable
from sharpkd.deploy.models import Model
from sharpkd.deploy.threads import Run, StageClock, depth
from sharpkd.deploy.tiling import frame_tile
from sharpkd.errors import UserError

GPU_BATCH = 4
COLOUR_TAGS = ("color_range", "colorspace", "color_primaries", "color_trc")


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
    clock: StageClock | None = None  # where the time went

    def stage_ms(self) -> dict[str, float]:
        """Per written frame: CPU ms of each stage beside the model, the model's wall ms, and the CPU ms of
        the rest of the process (the model's threads, the encoder's own threads, Python)."""
        c, n = self.clock, max(self.frames, 1)
        if c is None:
            return {}
        beside = {k: 1000 * v / n for k, v in c.cpu.items()}
        rest = 1000 * c.process / n - sum(beside.values())
        return {**beside, "model (wall)": 1000 * c.model / n, "model and the rest (CPU)": rest}

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


def _seconds(packet) -> float | None:
    ts = packet.pts if packet.pts is not None else packet.dts
    return float(ts * packet.time_base) if ts is not None and packet.time_base else None


class _Reader:
    """The input's packets in file order: frames of the video stream decoded to `_Frame`s, the other streams'
    packets as they are. What cannot be decoded is counted in the report."""

    def __init__(self, container, stream, report: Report, clock: StageClock):
        self.container, self.stream, self.report, self.clock = container, stream, report, clock
        self.packets = (
            0  # the video stream's packets read, one frame each (frames that decode to nothing count)
        )
        self.first = None  # the first decoded av.VideoFrame (its size, rotation and colour tags)

    def items(self) -> Iterator[object]:
        for packet in self._packets():
            if packet.stream.index == self.stream.index:
                self.packets += bool(packet.size)
                yield from self._decode(packet)
            elif packet.dts is not None:
                yield packet
        if self.report.stopped:  # the demuxer's end-of-file flush did not come
            yield from self._decode(None)

    def _packets(self) -> Iterator[object]:
        try:
            yield from self.container.demux()
        except av.FFmpegError as exc:
            self.report.stopped = f"reading stopped, the rest of the file is lost ({ffmpeg_why(exc)})"

    def _decode(self, packet) -> Iterator[Frame]:
        try:
            with self.clock.stage("decode"):
                frames = self.stream.decode(packet)
        except av.FFmpegError as exc:
            if packet is not None and packet.size:
                self.report.lose(_seconds(packet), ffmpeg_why(exc))
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
            with self.clock.stage("to RGB"):
                planes = rgb_planes(frame, w, h)
            yield Frame(planes, frame.pts)


def _rate(stream, report: Report) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        report.notes.append("frame rate unknown, written at 25 fps")
        return Fraction(25)
    return Fraction(rate)


class _Encoder:
    """The output's video stream: planar RGB frames in, encoded packets muxed (on the writer thread)."""

    def __init__(
        self, container, opts: VideoOptions, vin, first, width: int, rate: Fraction, clock: StageClock
    ):
        codec = av.Codec(opts.codec, "w")
        self.container, self.clock = container, clock
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
        with self.clock.stage("to YUV"):
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
        with self.clock.stage("encode"):
            self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        with self.clock.stage("encode"):
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
                 clock: StageClock, video_only: bool = False):  # fmt: skip
        self.container = av.open(str(path), "w", format=CONTAINERS[suffix])
        self.report = report
        self.shift: dict[int, int] = {}  # per copied stream: added to its timestamps since a reset
        self.last: dict[int, int] = {}  # per copied stream: the last dts written
        try:
            self.container.metadata.update(_global_metadata(src.container))
            self.video = _Encoder(self.container, opts, src.stream, src.first, width, src.rate, clock)
            self.copied = (
                {} if video_only else _copy_streams(src.container, src.stream, self.container, suffix, report)
            )
        except BaseException:
            self.container.close()
            raise

    def write(self, rgb: np.ndarray, pts: int | None) -> None:
        self.video.write(rgb, pts)

    def copy(self, packet) -> None:
        i = packet.stream.index
        out = self.copied.get(i)
        if out is None:
            return
        self._continue(i, packet)
        packet.stream = out
        self.container.mux(packet)

    def _continue(self, i: int, packet) -> None:
        """Timestamps that go back (segments joined end to end, issue 40 row 6) continue from the last one
        instead: a muxer refuses them. The sharpened video does the same (_Encoder.write)."""
        if packet.dts is None:
            return
        shift = self.shift.get(i, 0)
        last = self.last.get(i)
        if last is not None and packet.dts + shift <= last:
            self.shift[i] = shift = last + max(packet.duration or 1, 1) - packet.dts
            self.report.notes.append(
                f"stream #{i}'s timestamps go back at {float(last * packet.time_base):.2f} s: continued"
            )
        packet.dts += shift
        if packet.pts is not None:
            packet.pts += shift
        self.last[i] = packet.dts

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


def _open_input(path: Path):
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UserError(f"{printable(path)}: FFmpeg cannot open this video ({ffmpeg_why(exc)})") from None


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
        if isinstance(item, Frame):
            return head
    why = f": {reader.report.error or reader.report.stopped}" if reader.report.damaged else ""
    raise UserError(f"{printable(path)}: no video frame could be decoded{why}")


def sharpen_video(
    model: Model,
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
    `tile` None: whole frames up to 4K (tiling.frame_tile). Damaged frames are skipped and reported, not
    raised: the caller decides (Report.damaged)."""
    opts = (opts or VideoOptions()).on(model.device)
    suffix = (suffix or dst.suffix).lower()
    report = Report()
    t0 = time.perf_counter()
    model = sharing_the_cpu(model)
    with contextlib.closing(_open_input(src)) as inp, contextlib.ExitStack() as stack:
        vin = _video_stream(inp, src, report, model.on_cpu)
        clock = StageClock()
        reader = _Reader(inp, vin, report, clock)
        items = reader.items()
        head = _head(items, reader, src)
        source = _Source(inp, vin, reader.first, _rate(vin, report))
        w, h = source.first.width, source.first.height
        out = stack.enter_context(_closed(_Output(dst, suffix, source, opts, w, report, clock)))
        pout = None
        if preview is not None:
            pout = _Output(preview, suffix, source, opts, 2 * w, report, clock, video_only=True)
            stack.enter_context(_closed(pout))
        tiling = frame_tile(tile, w, h)

        def written() -> None:
            report.frames += 1
            if on_frame:
                on_frame(report.frames, report.listed or None)

        run = Run(ModelIO(model, tiling, overlap), _batch(model, opts), out, pout, written, clock)
        run.run(head, items, depth(w, h))
        report.clock = clock
        report.size, report.rate, report.codec = (w, h), source.rate, opts.codec
        report.pixel_format = out.video.stream.pix_fmt
        if report.resized:
            report.notes.append(f"{report.resized} frame(s) of another size scaled to {w}x{h}")
        _count_missing(report, reader.packets, vin.frames)
    report.seconds = time.perf_counter() - t0
    if tiling < max(w, h):
        report.notes.append(f"tiled {tiling}")
    return report


def _count_missing(report: Report, packets: int, listed: int) -> None:
    """Frames neither written nor already counted lost are lost too (issue 40 rows 7 and 16): packets that
    decoded to nothing (a stream cut before its first keyframe), and frames the container lists but the
    file no longer holds (a download cut short)."""
    found = report.frames + report.lost
    if report.stopped:  # the reason is said already
        return
    if packets > found:
        report.lost += packets - found
        report.error = (
            report.error or f"{packets - found} packet(s) decoded to no frame (a cut before a keyframe?)"
        )
    elif listed > found:
        report.lost += listed - found
        report.error = (
            report.error or f"the container lists {listed} frames, the file holds {found} (cut short?)"
        )


def sharing_the_cpu(model: Model) -> Model:
    """The model with ONNX Runtime's CPU threads sleeping between runs instead of spinning: in a video they
    share the CPU with the decoder and the encoder, and on 2 cores the spinning took about a fifth of each
    frame's CPU time from them. A model on a GPU, or run by torch, is returned as it is."""
    return model.with_session(spinning=False) if model.on_cpu else model


def _batch(model: Model, opts: VideoOptions) -> int:
    if opts.batch:
        return opts.batch
    return 1 if model.on_cpu else GPU_BATCH
