"""`sharpkd sharpen`: the student over image and video files of any size.

Inputs are files, folders (recursive) and globs. Every image goes through
`infer.tiled_apply` (via runtime.InferenceModel.apply), so a 6000x4000 photo runs
tile by tile in bounded memory whatever the model kind (ONNX, TorchScript, .pth).
Videos go through PyAV (FFmpeg) in video.py: audio and subtitles copied, the exact
size, timing, rotation and colour tags kept. One bad file never stops the batch: it
is reported by name and the exit status is 1 at the end, as it is when frames of a
video were lost to damage (the frames that could be decoded are written).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharpkd.errors import UserError
from sharpkd.files import _TEMP as TEMP_NAME
from sharpkd.files import atomic_path, remove_stale_temps
from sharpkd.images import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    list_files,
    load_image,
    printable,
    save_image,
    to_image,
    to_tensor,
)
from sharpkd.runtime import InferenceModel

# What FFmpeg reads (any container it knows; these suffixes are the ones looked for in folders).
# What a video is written as (video.CONTAINERS); WebM takes AV1 or VP9 only (--codec libsvtav1).
VIDEO_SAVE_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm"}
# Inputs in these keep their container (an .mkv's subtitles stay); the others are written as .mp4.
VIDEO_KEPT_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv"}
SAVE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
SIXTEEN_BIT_SUFFIXES = {".png", ".tif", ".tiff"}
OUTPUT_TAG = "_sharp"
PREVIEW_TAG = "_preview"

# Tiling outside a pipeline checkout (no params.yaml): a tile this small bounds memory at any image size.
CLI_TILE, CLI_OVERLAP = 256, 16


@dataclass
class Job:
    src: Path
    dst: Path
    preview: Path | None
    overwrite: bool = False  # False: a file that appears at dst meanwhile is not replaced

    @property
    def video(self) -> bool:
        return is_video(self.src)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _is_media(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES


def _is_own_output(path: Path) -> bool:
    return path.stem.endswith(OUTPUT_TAG) or path.stem.endswith(OUTPUT_TAG + PREVIEW_TAG)


def expand_inputs(inputs: list[str]) -> tuple[list[tuple[Path, Path | None]], list[str], list[str]]:
    """(files with the folder they were found under, errors, notes).

    A file named on the command line is always taken (a bad one is reported when read);
    folders and globs yield only image/video suffixes, and skip earlier `*_sharp*` outputs
    so that running twice does not sharpen the sharpened, and hidden temporaries (files.atomic_path's);
    a folder entry that cannot be read is an error naming it, the rest is still listed.
    """
    found: list[tuple[Path, Path | None]] = []
    errors, notes = [], []
    for arg in inputs:
        path = Path(arg)
        if path.is_file():
            found.append((path, None))
            continue
        if path.is_dir():
            unreadable: list[tuple[Path, str]] = []
            files, base = list_files(path, IMAGE_SUFFIXES | VIDEO_SUFFIXES, unreadable), path
            errors += [printable(f"{p}: {why}; skipped") for p, why in unreadable]
        elif glob.has_magic(arg):
            files, base = sorted(Path(f) for f in glob.glob(arg, recursive=True) if _is_media(Path(f))), None
        else:
            errors.append(f"{printable(arg)}: no such file or folder")
            continue
        own = [f for f in files if _is_own_output(f)]
        if own:
            notes.append(f"{printable(arg)}: skipped {len(own)} earlier output(s) named *{OUTPUT_TAG}*")
        # Another run's (or a killed run's) half-written outputs, `.<name>.<pid>-<random>.tmp<suffix>`.
        files = [f for f in files if f not in own and not TEMP_NAME.fullmatch(f.name)]
        if not files:
            errors.append(f"{printable(arg)}: no images or videos found")
        found += [(f, base) for f in files]
    return found, errors, notes


def _output_suffix(src: Path) -> str:
    if is_video(src):
        return src.suffix if src.suffix.lower() in VIDEO_KEPT_SUFFIXES else ".mp4"
    return src.suffix if src.suffix.lower() in SAVE_SUFFIXES else ".png"


def _default_name(src: Path) -> str:
    return f"{src.stem}{OUTPUT_TAG}{_output_suffix(src)}"


def _folder_name(src: Path, base: Path | None) -> Path:
    rel = src.relative_to(base) if base is not None else Path(src.name)
    return rel.with_suffix(_output_suffix(src))


def plan_jobs(
    found: list[tuple[Path, Path | None]],
    output: Path | None,
    single_file: bool,
    overwrite: bool,
    preview: bool,
) -> tuple[list[Job], list[str]]:
    """Where each output goes; refuses (as per-file errors, before any work) an output it cannot
    write: an unsupported format, a folder it cannot write in, an input or an existing file
    (unless `overwrite`)."""
    jobs, errors = [], []
    inputs = {src.resolve() for src, _ in found}
    taken: dict[Path, Path] = {}
    for src, base in found:
        if output is None:
            dst = src.with_name(_default_name(src))
        elif single_file and not output.is_dir() and output.suffix:
            dst = output
        else:  # a folder, also one still to be made (`-o newdir/`, `-o newdir`)
            dst = output / _folder_name(src, base)
        prev = dst.with_name(f"{dst.stem}{PREVIEW_TAG}{dst.suffix}") if preview else None
        problem = _format_problem(src, dst)
        for target in filter(None, (dst, prev)):
            problem = problem or _target_problem(target, taken, inputs, overwrite)
        if problem:
            errors.append(printable(f"{src}: {problem}"))
            continue
        for target in filter(None, (dst, prev)):
            taken[target.resolve()] = src
        jobs.append(Job(src, dst, prev, overwrite))
    return jobs, errors


def _target_problem(target: Path, taken: dict[Path, Path], inputs: set[Path], overwrite: bool) -> str | None:
    """Why `target` cannot be written (None: it can): another source's output, an input or an existing
    file (unless `overwrite`), a folder, a folder it cannot write in, a name the file system refuses."""
    try:
        resolved = target.resolve()
        if resolved in taken:
            return f"{target} is also the output of {taken[resolved]}; use -o with a folder per source"
        if not overwrite and resolved in inputs:
            return f"{target} would overwrite an input; pass --overwrite to replace it"
        if target.is_dir():
            return f"{target} is a folder; name a file, or a folder with several inputs"
        if not overwrite and target.exists():
            return f"{target} exists; pass --overwrite to replace it"
    except OSError as exc:  # ENAMETOOLONG: the _sharp tag took a long name over the limit (255 bytes)
        if exc.errno == errno.ENAMETOOLONG:
            return (
                f"its output name ({len(os.fsencode(target.name))} bytes) is longer than the file system "
                "allows; rename the input, or pass -o FOLDER (outputs there keep the input's name)"
            )
        return f"cannot check its output {target} ({exc.strerror or exc})"
    return _write_problem(target)


def _format_problem(src: Path, dst: Path) -> str | None:
    suffix = dst.suffix.lower()
    if is_video(src):
        if suffix not in VIDEO_SAVE_SUFFIXES:
            return (
                f"-o {dst}: a video is written as .mp4 (or .m4v, .mov, .mkv, .avi, .webm), not as '{suffix}'"
            )
    elif suffix not in SAVE_SUFFIXES:
        return f"-o {dst}: unsupported image format '{suffix}' (use .png, .jpg, .webp, .tif, .bmp)"
    return None


def _write_problem(target: Path) -> str | None:
    """Why `target` cannot be created, judged from its nearest existing folder (None: it can)."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot create {target.parent}: {folder} is a file"
    try:  # a file without a name where the system allows it: tried, not guessed from the mode bits
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def _match_alpha(alpha: np.ndarray | None, dtype) -> np.ndarray | None:
    """Alpha in the dtype of the RGB it is written with."""
    if alpha is None or alpha.dtype == dtype:
        return alpha
    if dtype == np.uint16:
        return alpha.astype(np.uint16) * 257
    return ((alpha.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def sharpen_image(model: InferenceModel, job: Job, tile: int, overlap: int) -> str:
    """Sharpen one image file; returns a note of what was converted ("" if nothing)."""
    img = load_image(job.src, keep_16bit=True)
    notes = ["16-bit"] if img.bits == 16 else []
    if img.alpha is not None:
        notes.append("alpha kept")
    # load_image's own notes, less the one that only says the alpha was split off.
    notes += [n for n in img.note.split("; ") if n and "alpha channel separated" not in n]
    out = model.apply(to_tensor(img.rgb), tile, overlap, what=printable(job.src))
    bits = img.bits
    suffix = job.dst.suffix.lower()
    if bits == 16 and suffix not in SIXTEEN_BIT_SUFFIXES:
        bits = 8
        notes.append(f"written as 8-bit ({suffix} has no 16-bit)")
    rgb = to_image(out, bits)
    alpha = _match_alpha(img.alpha, rgb.dtype)
    if alpha is not None and suffix in (".jpg", ".jpeg"):
        notes.append("alpha dropped (JPEG has none)")
    with _no_clobber(job):
        save_image(job.dst, rgb, alpha, overwrite=job.overwrite)
        if job.preview is not None:
            before = to_image(to_tensor(img.rgb), bits)
            both_alpha = None if alpha is None else np.concatenate([alpha, alpha], axis=1)
            save_image(
                job.preview, np.concatenate([before, rgb], axis=1), both_alpha, overwrite=job.overwrite
            )
    return "; ".join(notes)


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
    model: InferenceModel, job: Job, tile: int | None, overlap: int, on_frame=None, opts=None
) -> str:
    """One video through video.sharpen_video (PyAV), into temporary names renamed when complete; returns
    its note. Frames lost to damage raise FramesLost once the output (every decodable frame) is kept."""
    from sharpkd.video import sharpen_video as transcode

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


def default_tiling() -> tuple[int, int]:
    """infer.tile / infer.overlap from ./params.yaml when there is a valid one, else the CLI's own."""
    from sharpkd.config import load_params

    if Path("params.yaml").is_file():
        with contextlib.suppress(UserError):
            p = load_params("params.yaml").infer
            return p.tile, p.overlap
    return CLI_TILE, CLI_OVERLAP


def sharpen_paths(
    inputs: list[str],
    output: Path | None = None,
    model_path: Path | None = None,
    device: str = "cpu",
    tile: int | None = None,
    overlap: int | None = None,
    overwrite: bool = False,
    preview: bool = False,
    console=None,
    video=None,
) -> int:
    """The `sharpkd sharpen` command; returns the exit status (1 when any input failed or lost frames).
    `video`: video.VideoOptions (codec, crf, preset, batch) for the videos."""
    from rich.console import Console
    from rich.markup import escape

    from sharpkd.runtime import load_model, resolve_model

    out = console or Console()
    err = Console(stderr=True)
    video_tile = tile  # videos: whole frames up to 4K unless --tile is given (video.frame_tiling)
    tile, overlap = _checked_tiling(tile, overlap)
    # A missing model (file, or models:/ URI in the MLflow registry) is one clear UserError, before any work.
    model = load_model(resolve_model(model_path), device)
    found, errors, notes = expand_inputs(inputs)
    single_file = len(inputs) == 1 and len(found) == 1 and Path(inputs[0]).is_file()
    if output is not None and not single_file and output.exists() and not output.is_dir():
        raise UserError(f"-o {output}: with several inputs -o must be a folder, and this is a file")
    jobs, plan_errors = plan_jobs(found, output, single_file, overwrite, preview)
    errors += plan_errors
    for e in errors:
        err.print(f"[red]error[/red]: {escape(e)}", soft_wrap=True)
    for n in notes:
        out.print(escape(n), soft_wrap=True)
    if not jobs:
        if not errors:
            raise UserError("nothing to sharpen")
        return 1
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
    `video` (video.VideoOptions; None: its defaults)."""

    tile: int
    overlap: int
    video_tile: int | None = None
    video: object = None

    def describe(self, jobs: list[Job], device: str) -> str:
        """The tiling and, when there are videos, how they are encoded (for a model on `device`); checks the
        encoder before any work."""
        text = f"tile {self.tile}, overlap {self.overlap}"
        if not any(j.video for j in jobs):
            return text
        from sharpkd.video import VideoOptions, check_options

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


def _run_jobs(model: InferenceModel, jobs: list[Job], settings: _Settings, out, err) -> tuple[int, int, int]:
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


def _checked_tiling(tile: int | None, overlap: int | None) -> tuple[int, int]:
    """--tile / --overlap, each defaulting to default_tiling(); UserError when out of range."""
    d_tile, d_overlap = default_tiling()
    tile, overlap = d_tile if tile is None else tile, d_overlap if overlap is None else overlap
    if tile < 16:
        raise UserError(f"--tile must be at least 16, got {tile}")
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap must be at least 0 and smaller than the tile ({tile}), got {overlap}")
    return tile, overlap


def _sharpen_job(model: InferenceModel, job: Job, settings: _Settings, progress) -> str:
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
