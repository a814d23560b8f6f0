"""Footage as teacher-only inputs: frames sampled from the video clips of data.teacher_only.folder.

A clip (a file whose suffix is in CLIP_SUFFIXES, decoded by FFmpeg through PyAV) gives
`data.teacher_only.frames_per_clip` frames, or all of its frames when it has fewer: its frames are cut
into that many equal runs and one frame is drawn in each run, from `seed` and the clip's name
(clip_seed), so the sample spreads over the whole clip and is the same on every machine and run.
Each sampled frame is one teacher-only input of kind `frame`, named `<clip>#f<index>`: index is the
frame's position, from 0, in the clip's decoded (display-ordered) frames.

The scan (sample_clip) decodes every frame of a clip once, converting none, to count them and to show
the clip readable before any work; the degrade stage decodes it once more and keeps only the sampled
frames, of one clip at a time (ClipFrames). A clip that cannot be opened, has no video stream, gives
no frame or fails to decode anywhere is unreadable (ClipReadError), as a truncated image is. Frames
that FFmpeg marks corrupt are never drawn. Frames are taken as stored: rotation metadata is not
applied (every training crop is turned all 8 ways anyway).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharpkd.data.degradation import center_crop
from sharpkd.deploy.images import VIDEO_SUFFIXES, printable
from sharpkd.errors import UserError

# What FFmpeg reads (the one list, deploy/images.py); a file with another suffix is not looked at.
CLIP_SUFFIXES = VIDEO_SUFFIXES


class ClipReadError(UserError):
    """A video clip that cannot be decoded; the message names the file."""


def is_clip(path: Path) -> bool:
    return path.suffix.lower() in CLIP_SUFFIXES


def clip_seed(seed: int, name: str) -> list[int]:
    """The seed of one clip's frame sample: independent of the other clips and images (cf. pairs.image_seed)."""
    return [seed, 2, zlib.crc32(name.encode())]


def frame_name(clip: str, index: int) -> str:
    """A sampled frame's name in the manifest: the clip's path in the folder and the frame's index."""
    return f"{clip}#f{index:04d}"


def sample_positions(count: int, frames_per_clip: int, seed: int, name: str) -> list[int]:
    """min(count, frames_per_clip) sorted distinct positions in range(count): one drawn in each of as
    many equal runs, from the clip's own seed."""
    k = min(count, frames_per_clip)
    edges = [i * count // k for i in range(k + 1)]
    rng = np.random.default_rng(clip_seed(seed, name))
    return [int(rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _decoded(path: Path) -> Iterator[tuple[int, object]]:
    """(index, av.VideoFrame) of each frame of the clip's first video stream, decoding errors as ClipReadError."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipReadError(f"{printable(path)}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            yield from enumerate(container.decode(stream))
    except (av.FFmpegError, OSError, ValueError) as exc:  # some of PyAV's errors are plain ValueErrors
        why = getattr(exc, "strerror", None) or str(exc)  # FFmpeg's words, without the file name again
        raise ClipReadError(f"{printable(path)}: cannot decode video ({why})") from None


@dataclass(frozen=True)
class SampledClip:
    """One clip's sampled frames: their indices and (height, width) as decoded (before any crop)."""

    path: Path
    frames: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    count: int  # the clip's frames that can be drawn (decoded, not marked corrupt)


def sample_clip(path: Path, name: str, frames_per_clip: int, seed: int) -> SampledClip:
    """Decode the whole clip once (no frame converted), then draw its sample; ClipReadError if unreadable."""
    indices, sizes = [], []
    for i, frame in _decoded(path):
        if not frame.is_corrupt:
            indices.append(i)
            sizes.append((frame.height, frame.width))
    if not indices:
        raise ClipReadError(f"{printable(path)}: no video frame could be decoded")
    picked = sample_positions(len(indices), frames_per_clip, seed, name)
    return SampledClip(path, tuple(indices[j] for j in picked), tuple(sizes[j] for j in picked), len(indices))


def read_frames(path: Path, frames: Sequence[int], max_side: int) -> dict[int, np.ndarray]:
    """The frames of `path` at `frames` as HxWx3 uint8 RGB, each centre-cropped to max_side (0 = whole);
    the others are decoded and dropped, so memory holds only these."""
    wanted, out = set(frames), {}
    for i, frame in _decoded(path):
        if i in wanted:
            out[i] = np.ascontiguousarray(center_crop(frame.to_ndarray(format="rgb24"), max_side))
            if len(out) == len(wanted):
                break
    if len(out) != len(wanted):
        raise ClipReadError(
            f"{printable(path)}: frames {sorted(wanted - set(out))} are gone (the clip changed while degrade "
            "ran); run `dvc repro -f -s degrade` again"
        )
    return out


class ClipFrames:
    """The sampled frames of one clip at a time, for writing them in manifest order (a clip's rows follow
    one another): a clip is decoded when its first frame is asked for, and the last clip's frames are let go."""

    def __init__(self, clips: dict[str, tuple[int, ...]], max_side: int):
        self.clips, self.max_side = clips, max_side  # origin -> the sampled frame indices
        self._origin: str | None = None
        self._frames: dict[int, np.ndarray] = {}

    def frame(self, origin: str, index: int) -> np.ndarray:
        if origin != self._origin:
            self._frames = {}  # before decoding the next clip
            self._frames = read_frames(Path(origin), self.clips[origin], self.max_side)
            self._origin = origin
        return self._frames[index]
