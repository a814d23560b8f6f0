"""`sharpkd sharpen`: the student over image and video files of any size.

Inputs are files, folders (recursive) and globs (deploy/jobs.py plans them). Every image goes through
the tiled path (Model.apply, deploy/tiling.py), so a 6000x4000 photo runs tile by tile in bounded memory
whatever the model kind. A greyscale image comes out greyscale: it runs through the colour model as
three equal channels and the output's luma (BT.601 Y) is kept, so no colour fringe can appear. Alpha is
kept as it is (not sharpened); 16-bit images stay 16-bit where the output format holds 16 bits. Videos go
through PyAV (FFmpeg) in deploy/transcode.py: audio and subtitles copied, the exact size, timing, rotation
and colour tags kept. One bad file never stops the batch: it is reported by name and the exit status is 1
at the end, as it is when frames of a video were lost to damage (the frames that could be decoded are
written).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharpkd.deploy.encoding import VideoOptions, check_container, check_options
from sharpkd.deploy.images import load_image, printable, save_image
from sharpkd.deploy.jobs import SIXTEEN_BIT_SUFFIXES, Job, expand_inputs, plan_jobs
from sharpkd.deploy.models import Model, load_model
from sharpkd.deploy.pixels import batch_to_image, bits_of, image_to_batch, luma, to_float, to_uint
from sharpkd.deploy.tiling import check_tiling
from sharpkd.deploy.transcode import sharpen_video as transcode
from sharpkd.errors import UserError
from sharpkd.files import atomic_path, remove_stale_temps


def _match_alpha(alpha: np.ndarray | None, dtype) -> np.ndarray | None:
    """Alpha in the dtype of the pixels it is written with."""
    if alpha is None or alpha.dtype == dtype:
        return alpha
    if dtype == np.uint16:
        return alpha.astype(np.uint16) * 257
    return ((alpha.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def sharpen_pixels(
    model: Model,
    pixels: np.ndarray,
    tile: int,
    overlap: int,
    bits: int | None = None,
    what: str | None = None,
) -> np.ndarray:
    """HxWx3 RGB or HxW greyscale, uint8 or uint16 -> the sharpened image, the same shape, at `bits` (default:
    the input's). Greyscale runs as three equal channels and keeps the luma of the output as the colour
    path writes it (clipped to [0, 1] first), so it is that image's Y channel within one level."""
    bits = bits or bits_of(pixels)
    grey = pixels.ndim == 2
    rgb = np.repeat(pixels[..., None], 3, axis=2) if grey else pixels
    out = model.apply(image_to_batch(rgb), tile, overlap, what=what)
    return to_uint(luma(np.clip(out, 0, 1)), bits) if grey else batch_to_image(out, bits)


def _converted(pixels: np.ndarray, bits: int) -> np.ndarray:
    """The input at `bits` (the preview's left half), with the same rounding as the output."""
    return pixels if bits_of(pixels) == bits else to_uint(to_float(pixels), bits)


def sharpen_image(model: Model, job: Job, tile: int, overlap: int) -> str:
    """Sharpen one image file; returns a note of what was converted ("" if nothing)."""
    img = load_image(job.src, keep_16bit=True)
    notes = ["16-bit"] if img.bits == 16 else []
    if img.alpha is not None:
        notes.append("alpha kept")
    # load_image's own notes, less those that only say the alpha was split off or grey made RGB.
    notes += [n for n in img.note.split("; ") if n and not _internal(n)]
    if img.grey:
        notes.append("greyscale")
    bits = img.bits
    suffix = job.dst.suffix.lower()
    if bits == 16 and suffix not in SIXTEEN_BIT_SUFFIXES:
        bits = 8
        notes.append(f"written as 8-bit ({suffix} has no 16-bit)")
    pixels = img.rgb[..., 0] if img.grey else img.rgb
    out = sharpen_pixels(model, pixels, tile, overlap, bits, what=printable(job.src))
    alpha = _match_alpha(img.alpha, out.dtype)
    if alpha is not None and suffix in (".jpg", ".jpeg"):
        notes.append("alpha dropped (JPEG has none)")
    with _no_clobber(job):
        save_image(job.dst, out, alpha, overwrite=job.overwrite)
        if job.preview is not None:
            both_alpha = None if alpha is None else np.concatenate([alpha, alpha], axis=1)
            before = _converted(pixels, bits)
            save_image(
                job.preview, np.concatenate([before, out], axis=1), both_alpha, overwrite=job.overwrite
            )
    return "; ".join(notes)


def _internal(note: str) -> bool:
    """load_image's notes about its own RGB form, not about the file."""
    return "alpha channel separated" in note or "expanded to RGB" in note


@contextlib.contextmanager
def _no_clobber(job: Job):
    """A file that appeared at the output after planning (another run writing the same name) is kept."""
    try:
        yield
    except FileExistsError as exc:
        raise UserError(
            f"{printable(exc.args[0]).removesuffix(' exists')} was created meanwhile (by another run?); "
            "it is kept: pass --overwrite to replace it"
        ) from None


class FramesLost(UserError):
    """A video was written, but frames of it could not be decoded (`note`: the written file's line)."""

    def __init__(self, message: str, note: str):
        super().__init__(message)
        self.note = note


def sharpen_video(
    model: Model, job: Job, tile: int | None, overlap: int, on_frame=None, opts: VideoOptions | None = None
) -> str:
    """One video through transcode.sharpen_video (PyAV), into temporary names renamed when complete; returns
    its note. Frames lost to damage raise FramesLost once the output (every decodable frame) is kept."""
    with _no_clobber(job), contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(job.dst, overwrite=job.overwrite))
        ptmp = None
        if job.preview is not None:
            ptmp = stack.enter_context(atomic_path(job.preview, overwrite=job.overwrite))
        report = transcode(model, job.src, tmp, ptmp, opts, tile, overlap, on_frame, suffix=job.dst.suffix)
    note = "; ".join([report.summary(), *report.notes])
    if report.damaged:
        raise FramesLost(
            f"{printable(job.src)}: {report.problem()}; {printable(job.dst)} holds the others", note
        )
    return note


def sharpen_paths(
    inputs: list[str],
    output: Path | None = None,
    model_path: str | Path | None = None,
    device: str = "cpu",
    tile: int | None = None,
    overlap: int | None = None,
    overwrite: bool = False,
    preview: bool = False,
    console=None,
    video: VideoOptions | None = None,
) -> int:
    """The `sharpkd sharpen` command; returns the exit status (1 when any input failed or lost frames).
    `video`: VideoOptions (codec, crf, preset, batch) for the videos; `model_path`: what `--model` names
    (models.resolve_model)."""
    from rich.console import Console
    from rich.markup import escape

    out = console or Console()
    err = Console(stderr=True)
    video_tile = tile  # videos: whole frames up to 4K unless --tile is given (tiling.frame_tile)
    tile, overlap = check_tiling(tile, overlap)
    found, errors, notes = expand_inputs(inputs)
    single_file = len(inputs) == 1 and len(found) == 1 and Path(inputs[0]).is_file()
    if output is not None and not single_file and os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"-o {output}: with several inputs -o must be a folder, and this is a file")
    jobs, plan_errors = plan_jobs(found, output, single_file, overwrite, preview)
    errors += plan_errors
    # The planning is done before the model is loaded: what it refuses costs nothing.
    for suffix in sorted({j.dst.suffix.lower() for j in jobs if j.video}):
        check_container(video or VideoOptions(), suffix)
    for e in errors:
        err.print(f"[red]error[/red]: {escape(e)}", soft_wrap=True)
    for n in notes:
        out.print(escape(n), soft_wrap=True)
    if not jobs:
        if not errors:
            raise UserError("nothing to sharpen")
        return 1
    # A missing model (file, or models:/ URI in the MLflow registry) is one clear UserError, before any work.
    model = load_model(model_path, device)
    settings = _Settings(tile, overlap, video_tile, video)
    out.print(f"model: {escape(model.describe())}; {settings.describe(jobs, model.device)}", soft_wrap=True)
    _remove_stale_temps(jobs)
    done, failed, lost = _run_jobs(model, jobs, settings, out, err)
    failed += len(errors)
    summary = f"sharpened {done} file(s)"
    if lost:
        summary += f"; {lost} with frames lost to damage"
    if failed:
        summary += f"; {failed} failed (see the errors above)"
    out.print(summary)
    return 1 if failed or lost else 0


@dataclass
class _Settings:
    """How files are run: images tiled (tile, overlap); videos by `video_tile` (None: whole frames) and
    `video` (VideoOptions; None: its defaults)."""

    tile: int
    overlap: int
    video_tile: int | None = None
    video: VideoOptions | None = None

    def describe(self, jobs: list[Job], device: str) -> str:
        """The tiling and, when there are videos, how they are encoded (for a model on `device`); checks the
        encoder before any work."""
        text = f"tile {self.tile}, overlap {self.overlap}"
        if not any(j.video for j in jobs):
            return text
        self.video = (self.video or VideoOptions()).on(device)
        check_options(self.video)
        frames = f"tile {self.video_tile}" if self.video_tile else "whole frames up to 4K"
        return f"{text}; videos: {frames}, {self.video.describe()}"


def _remove_stale_temps(jobs: list[Job]) -> None:
    """What a killed run left in the output folders (its temporaries; a live run's are left alone)."""
    folders = {t.parent for j in jobs for t in (j.dst, j.preview) if t is not None}
    for folder in sorted(folders):
        with contextlib.suppress(OSError):
            remove_stale_temps(folder)


def _run_jobs(model: Model, jobs: list[Job], settings: _Settings, out, err) -> tuple[int, int, int]:
    """Every job under a progress bar; (done, failed, with frames lost)."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = failed = lost = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[rate]}"), console=out, transient=True) as progress:
        files_task = progress.add_task("files", total=len(jobs), rate="")
        for job in jobs:
            progress.update(files_task, description=escape(printable(job.src.name)))
            try:
                _print_done(progress, job, _sharpen_job(model, job, settings, progress))
                done += 1
            except FramesLost as exc:  # written, less the frames that could not be decoded
                _print_done(progress, job, exc.note)
                err.print(f"[red]error[/red]: {escape(printable(str(exc)))}", soft_wrap=True)
                done, lost = done + 1, lost + 1
            except Exception as exc:  # one bad file must not stop the batch; it is named and counted
                failed += 1
                msg = str(exc) if isinstance(exc, UserError) else f"{job.src}: {type(exc).__name__}: {exc}"
                err.print(f"[red]error[/red]: {escape(printable(msg))}", soft_wrap=True)
            progress.advance(files_task)
    return done, failed, lost


def _print_done(progress, job: Job, note: str) -> None:
    from rich.markup import escape

    extra = f" ({note})" if note else ""
    progress.console.print(escape(f"{printable(job.src)} -> {printable(job.dst)}{extra}"), soft_wrap=True)
    if job.preview is not None:
        progress.console.print(f"  preview: {escape(printable(job.preview))}", soft_wrap=True)


def _sharpen_job(model: Model, job: Job, settings: _Settings, progress) -> str:
    """One image or video; a video shows its frames as a second bar while it runs, with frames/s and ETA."""
    if not job.video:
        return sharpen_image(model, job, settings.tile, settings.overlap)
    frames_task = progress.add_task("  frames", total=None, rate="")
    t0 = time.perf_counter()

    def on_frame(n: int, total: int | None) -> None:  # called by the writer thread
        fps = n / max(time.perf_counter() - t0, 1e-6)
        eta = f", ETA {_clock((total - n) / fps)}" if total and total >= n else ""
        progress.update(frames_task, completed=n, total=total, rate=f"{fps:.1f} frames/s{eta}")

    try:
        return sharpen_video(model, job, settings.video_tile, settings.overlap, on_frame, settings.video)
    finally:
        progress.remove_task(frames_task)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"
