"""`sharpkd sharpen`: the student over image and video files of any size.

Inputs are files, folders (recursive) and globs. Every image goes through
`infer.tiled_apply` (via runtime.InferenceModel.apply), so a 6000x4000 photo runs
tile by tile in bounded memory whatever the model kind (ONNX, TorchScript, .pth).
One bad file never stops the batch: it is reported by name and the exit status
is 1 at the end.
"""

from __future__ import annotations

import contextlib
import glob
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharpkd.errors import UserError
from sharpkd.files import atomic_path
from sharpkd.images import IMAGE_SUFFIXES, load_image, printable, save_image, to_image, to_tensor
from sharpkd.runtime import InferenceModel

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"}
# The containers that take mp4v, the codec OpenCV always has (WebM and MPEG-PS refuse it).
VIDEO_SAVE_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv"}
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


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, held by Python as lone surrogates
        return False
    return True


def opencv_name(path: Path) -> str:
    """str(path) for OpenCV's video functions, which crash the process (SIGSEGV) on a name that is
    not valid UTF-8; such a name is refused instead."""
    if not _utf8(path):
        raise UserError(f"{printable(path)}: OpenCV cannot open a video whose path is not valid UTF-8")
    return str(path)


def _is_media(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES


def _is_own_output(path: Path) -> bool:
    return path.stem.endswith(OUTPUT_TAG) or path.stem.endswith(OUTPUT_TAG + PREVIEW_TAG)


def expand_inputs(inputs: list[str]) -> tuple[list[tuple[Path, Path | None]], list[str], list[str]]:
    """(files with the folder they were found under, errors, notes).

    A file named on the command line is always taken (a bad one is reported when read);
    folders and globs yield only image/video suffixes, and skip earlier `*_sharp*` outputs
    so that running twice does not sharpen the sharpened.
    """
    found: list[tuple[Path, Path | None]] = []
    errors, notes = [], []
    for arg in inputs:
        path = Path(arg)
        if path.is_file():
            found.append((path, None))
            continue
        if path.is_dir():
            files, base = sorted(f for f in path.rglob("*") if _is_media(f)), path
        elif glob.has_magic(arg):
            files, base = sorted(Path(f) for f in glob.glob(arg, recursive=True) if _is_media(Path(f))), None
        else:
            errors.append(f"{printable(arg)}: no such file or folder")
            continue
        own = [f for f in files if _is_own_output(f)]
        if own:
            notes.append(f"{printable(arg)}: skipped {len(own)} earlier output(s) named *{OUTPUT_TAG}*")
        files = [f for f in files if f not in own]
        if not files:
            errors.append(f"{printable(arg)}: no images or videos found")
        found += [(f, base) for f in files]
    return found, errors, notes


def _default_name(src: Path) -> str:
    if is_video(src):
        return f"{src.stem}{OUTPUT_TAG}.mp4"  # mp4v, the codec OpenCV always has, wants an MP4 container
    suffix = src.suffix if src.suffix.lower() in SAVE_SUFFIXES else ".png"
    return f"{src.stem}{OUTPUT_TAG}{suffix}"


def _folder_name(src: Path, base: Path | None) -> Path:
    rel = src.relative_to(base) if base is not None else Path(src.name)
    if is_video(src):
        return rel.with_suffix(".mp4")
    return rel if rel.suffix.lower() in SAVE_SUFFIXES else rel.with_suffix(".png")


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
            if problem:
                break
            resolved = target.resolve()
            if resolved in taken:
                problem = f"{target} is also the output of {taken[resolved]}; use -o with a folder per source"
            elif not overwrite and resolved in inputs:
                problem = f"{target} would overwrite an input; pass --overwrite to replace it"
            elif target.is_dir():
                problem = f"{target} is a folder; name a file, or a folder with several inputs"
            elif not overwrite and target.exists():
                problem = f"{target} exists; pass --overwrite to replace it"
            else:
                problem = _write_problem(target)
        if problem:
            errors.append(printable(f"{src}: {problem}"))
            continue
        for target in filter(None, (dst, prev)):
            taken[target.resolve()] = src
        jobs.append(Job(src, dst, prev, overwrite))
    return jobs, errors


def _format_problem(src: Path, dst: Path) -> str | None:
    suffix = dst.suffix.lower()
    if is_video(src):
        if suffix not in VIDEO_SAVE_SUFFIXES:
            return f"-o {dst}: a video is written as .mp4 (or .m4v, .mov, .avi, .mkv), not as '{suffix}'"
        if not _utf8(src):
            return "OpenCV cannot open a video whose path is not valid UTF-8; rename it"
        if not _utf8(dst):
            return f"{dst}: OpenCV cannot write a video whose path is not valid UTF-8; choose another -o"
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
    out = model.apply(to_tensor(img.rgb), tile, overlap)
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


def sharpen_video(model: InferenceModel, job: Job, tile: int, overlap: int, on_frame=None) -> str:
    """Frame by frame through the model; same fps and size (audio is not carried: OpenCV has none)."""
    import cv2

    cap = cv2.VideoCapture(opencv_name(job.src))
    if not cap.isOpened():
        raise UserError(f"{printable(job.src)}: OpenCV cannot open this video")
    fps, notes = _frame_rate(cap)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    total = total if total > 0 else None  # some containers do not say
    if on_frame:
        on_frame(0, total)
    writers: list = []
    frames, t0, size = 0, time.perf_counter(), (0, 0)
    with _no_clobber(job), contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(job.dst, overwrite=job.overwrite))
        ptmp = (
            stack.enter_context(atomic_path(job.preview, overwrite=job.overwrite))
            if job.preview is not None
            else None
        )
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                if not writers:
                    # Opened on the first frame: decoded frames (auto-rotated) are the truth, not the header.
                    h, w = frame.shape[:2]
                    size = (w, h)
                    _open_writers(writers, job, tmp, ptmp, fps, size)
                sharp_bgr = _sharpen_bgr(model, frame, tile, overlap)
                writers[0].write(sharp_bgr)
                if ptmp is not None:
                    writers[1].write(np.concatenate([frame, sharp_bgr], axis=1))
                frames += 1
                if on_frame:
                    on_frame(frames, total)
        finally:
            # Released before atomic_path renames the files, so they are complete.
            for wr in writers:
                wr.release()
            cap.release()
        if frames == 0:
            raise UserError(f"{printable(job.src)}: no frame could be decoded")
        notes += _check_written(job, tmp, ptmp, frames, size)
    secs = time.perf_counter() - t0
    notes.insert(0, f"{frames} frames at {fps:g} fps, {frames / secs:.1f} frames/s")
    return "; ".join(notes)


def _frame_rate(cap) -> tuple[float, list[str]]:
    """The video's fps and a note when its container does not say it (it is written at 25 fps then)."""
    import cv2

    fps = cap.get(cv2.CAP_PROP_FPS)
    if not fps or fps != fps or fps <= 0:  # NaN != NaN
        return 25.0, ["frame rate unknown, written at 25 fps"]
    return fps, []


def _open_writers(writers: list, job: Job, tmp: Path, ptmp: Path | None, fps: float, size: tuple[int, int]):
    """mp4v writers for the output (and the side-by-side preview), added to `writers` one by one so
    that the caller releases whichever were opened when one fails."""
    import cv2

    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
    w, h = size
    writers.append(cv2.VideoWriter(opencv_name(tmp), fourcc, fps, (w, h)))
    if ptmp is not None:
        writers.append(cv2.VideoWriter(opencv_name(ptmp), fourcc, fps, (2 * w, h)))
    if not all(wr.isOpened() for wr in writers):
        raise UserError(f"{printable(job.dst)}: OpenCV cannot write an mp4v video there")


def _sharpen_bgr(model: InferenceModel, frame: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """One OpenCV (BGR) frame through the model, back as BGR."""
    rgb = np.ascontiguousarray(frame[..., ::-1])
    sharp = to_image(model.apply(to_tensor(rgb), tile, overlap))
    return np.ascontiguousarray(sharp[..., ::-1])


def _check_written(job: Job, tmp: Path, ptmp: Path | None, frames: int, size: tuple[int, int]) -> list[str]:
    """Notes on the written videos, read back; UserError when a writer lost frames.

    OpenCV's writer reports failures only as log lines: what it wrote is read back before it is kept.
    """
    notes = []
    for path, dst in ((tmp, job.dst), (ptmp, job.preview)):
        if path is None:
            continue
        count, width, height = _video_info(path)
        # Some containers give an estimated count (duration x fps): allow a frame or 1% off.
        if count < frames - max(1, frames // 100):
            raise UserError(
                f"{printable(dst)}: OpenCV's writer failed ({count} of {frames} frames could be read "
                "back); nothing was kept (is the disk full?)"
            )
        if path == tmp and (width, height) != size:
            notes.append(f"{size[0]}x{size[1]} written as {width}x{height} (the mp4v codec needs even sides)")
    return notes


def _video_info(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of a video file as OpenCV reads it back; (0, 0, 0) when it cannot."""
    import cv2

    cap = cv2.VideoCapture(opencv_name(path))
    try:
        if not cap.isOpened():
            return 0, 0, 0
        props = (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT)
        count, width, height = (int(cap.get(p)) for p in props)
        return count, width, height
    finally:
        cap.release()


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
) -> int:
    """The `sharpkd sharpen` command; returns the exit status (1 when any input failed)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sharpkd.runtime import load_model

    out = console or Console()
    err = Console(stderr=True)
    tile, overlap = _checked_tiling(tile, overlap)
    model = load_model(model_path, device)  # a missing model is one clear UserError, before any work
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
    out.print(f"model: {escape(model.describe())}; tile {tile}, overlap {overlap}", soft_wrap=True)
    failed = len(errors)
    done = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=True) as progress:
        files_task = progress.add_task("files", total=len(jobs))
        for job in jobs:
            progress.update(files_task, description=escape(printable(job.src.name)))
            try:
                note = _sharpen_job(model, job, tile, overlap, progress)
                done += 1
                extra = f" ({note})" if note else ""
                progress.console.print(
                    escape(f"{printable(job.src)} -> {printable(job.dst)}{extra}"), soft_wrap=True
                )
                if job.preview is not None:
                    progress.console.print(f"  preview: {escape(printable(job.preview))}", soft_wrap=True)
            except Exception as exc:  # one bad file must not stop the batch; it is named and counted
                failed += 1
                msg = str(exc) if isinstance(exc, UserError) else f"{job.src}: {type(exc).__name__}: {exc}"
                err.print(f"[red]error[/red]: {escape(printable(msg))}", soft_wrap=True)
            progress.advance(files_task)
    summary = f"sharpened {done} file(s)"
    if failed:
        summary += f"; {failed} failed (see the errors above)"
    out.print(summary)
    return 1 if failed else 0


def _checked_tiling(tile: int | None, overlap: int | None) -> tuple[int, int]:
    """--tile / --overlap, each defaulting to default_tiling(); UserError when out of range."""
    d_tile, d_overlap = default_tiling()
    tile, overlap = tile or d_tile, d_overlap if overlap is None else overlap
    if tile < 16:
        raise UserError(f"--tile must be at least 16, got {tile}")
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap must be at least 0 and smaller than the tile ({tile}), got {overlap}")
    return tile, overlap


def _sharpen_job(model: InferenceModel, job: Job, tile: int, overlap: int, progress) -> str:
    """One image or video; a video shows its frames as a second bar while it runs."""
    if not job.video:
        return sharpen_image(model, job, tile, overlap)
    frames_task = progress.add_task("  frames", total=None)

    def on_frame(n, total):
        progress.update(frames_task, completed=n, total=total)

    try:
        return sharpen_video(model, job, tile, overlap, on_frame)
    finally:
        progress.remove_task(frames_task)
