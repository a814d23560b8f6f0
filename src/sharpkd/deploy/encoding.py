"""Which encoder, with which options and pixel format, a sharpened video is written with.

Video is encoded by `VideoOptions.codec` (libx264 unless told) at its pixel format (`pixel_format`): 4:2:0
where both sides are even and the input is 4:2:0 (what every player decodes), 4:4:4 where a side is odd
(4:2:0 cannot hold an odd side, and padding would change the size) or the input is 4:4:4 or RGB; 4:2:2
stays 4:2:2 where its width allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from dataclasses import dataclass
from fractions import Fraction

import av

from sharpkd.errors import UserError

# Output suffix -> FFmpeg muxer (given explicitly: the temporary name must not decide it).
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
DEFAULT_CODEC = "libx264"
# --crf when not given: "visually lossless" (the encoders' own defaults, 23 and 28, blur the detail we add).
DEFAULT_CRF = {"libx264": 18, "libx265": 20}
# --preset when not given and the model runs on the CPU, where the encoder takes CPU time from the model:
# the fastest (on 2 cores at 1080p, x264's ultrafast costs the INT8 student about a fifth of its speed,
# veryfast a third, medium more than half; the files are larger at the same crf). On a GPU: the encoder's.
CPU_PRESET = {"libx264": "ultrafast", "libx265": "ultrafast"}
# Encoder threads with the model on the CPU: x264 on the writer thread itself, which yields to the model
# (threads.BEHIND_THE_MODEL), rather than on frame threads of its own. On 2 cores (AMD EPYC, 1080p, INT8),
# end to end against the model alone, medians of 5 runs against 3 with x264's default: the balanced
# student 0.87 against 0.82, the fast one 0.74 against 0.87. Within the noise of this machine either way
# (docs/export.md); kept for the default student.
CPU_ENCODER_THREADS = {"libx264": 1}
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


@dataclass(frozen=True)
class VideoOptions:
    """How the video stream is encoded; `batch`: frames per model call (0: GPU_BATCH on CUDA, else 1)."""

    codec: str = DEFAULT_CODEC
    crf: int | None = None
    preset: str | None = None
    batch: int = 0
    threads: int = 0  # the encoder's threads (0: its default)

    def encoder_options(self) -> dict[str, str]:
        """The encoder's AVOptions for --crf and --preset."""
        if self.codec in QUIET_ENV:
            os.environ.setdefault(*QUIET_ENV[self.codec])
        opts = dict(QUIET.get(self.codec, {}))
        if self.preset:
            opts["preset"] = self.preset
        if self.threads:
            opts["threads"] = str(self.threads)
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
        """These options for a model on `device`: on the CPU, the CPU preset (CPU_PRESET) and encoder threads
        (CPU_ENCODER_THREADS) where none are given."""
        if not str(device).startswith("cpu"):
            return self
        preset = self.preset or CPU_PRESET.get(self.codec)
        threads = self.threads or CPU_ENCODER_THREADS.get(self.codec, 0)
        return dataclasses.replace(self, preset=preset, threads=threads)

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
            f"--codec {opts.codec}: cannot be opened with {opts.describe()} ({ffmpeg_why(exc)})"
        ) from None


def check_container(opts: VideoOptions, suffix: str) -> None:
    """A clear UserError before any work when the container `suffix` names cannot hold what --codec encodes
    (WebM takes only VP8, VP9 and AV1), naming the known encoders here that it takes. FFmpeg's muxer is
    asked, not a table; an encoder check_options refuses anyway is left to it."""
    try:
        codec = av.Codec(opts.codec, "w")
    except av.codec.codec.UnknownCodecError:
        return
    if codec.type != "video" or suffix.lower() not in CONTAINERS:
        return
    with av.open(io.BytesIO(), "w", format=CONTAINERS[suffix.lower()]) as muxer:
        taken = muxer.supported_codecs
    if codec.canonical_name in taken:
        return
    fits = []
    for name in QUALITY_OPTION:  # the known encoders this FFmpeg has (a name can be a decoder's only)
        with contextlib.suppress(av.codec.codec.UnknownCodecError):
            if av.Codec(name, "w").canonical_name in taken:
                fits.append(name)
    raise UserError(
        f"--codec {opts.codec}: {suffix} cannot hold {codec.canonical_name} video; it takes "
        f"{' / '.join(fits) or 'no encoder known here'} (pass one with --codec), or write another container "
        "(.mkv takes most)"
    )


def encoder_available(name: str) -> bool:
    """Whether encoder `name` opens here (NVENC needs an NVIDIA GPU and driver, not only FFmpeg's code)."""
    try:
        check_options(VideoOptions(codec=name))
    except UserError:
        return False
    return True


def ffmpeg_why(exc: BaseException) -> str:
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
