"""What `sharpkd sharpen` is asked to do: the inputs (files, folders, globs) and where each output goes,
every output checked before any work (format, folder, an existing file, a name too long)."""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sharpkd.deploy.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, list_files, printable
from sharpkd.files import _TEMP as TEMP_NAME
from sharpkd.files import _name_max

# What FFmpeg reads (any container it knows; these suffixes are the ones looked for in folders).
# What a video is written as (video.CONTAINERS); WebM takes AV1 or VP9 only (--codec libsvtav1). Not AVI:
# it has no timestamps, only a frame rate, so variable frame timing and the audio's offset are lost.
VIDEO_SAVE_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm"}
# Inputs in these keep their container (an .mkv's subtitles stay); the others are written as .mp4.
VIDEO_KEPT_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv"}
SAVE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
SIXTEEN_BIT_SUFFIXES = {".png", ".tif", ".tiff"}
# What folders and globs yield: GIFs too (their first frame, written as .png; load_image says when there
# are more), though not in IMAGE_SUFFIXES, which also lists training images (palettes are poor ground truth).
INPUT_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES | {".gif"}
OUTPUT_TAG = "_sharp"
PREVIEW_TAG = "_preview"


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
    return path.is_file() and path.suffix.lower() in INPUT_SUFFIXES


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
            files, base = list_files(path, INPUT_SUFFIXES, unreadable), path
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


def default_output(src: Path) -> str:
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
            dst = src.with_name(default_output(src))
        elif single_file and not os.path.isdir(output) and output.suffix:  # isdir: False on ENAMETOOLONG
            dst = output
        else:  # a folder, also one still to be made (`-o newdir/`, `-o newdir`)
            dst = output / _folder_name(src, base)
        prev = dst.with_name(f"{dst.stem}{PREVIEW_TAG}{dst.suffix}") if preview else None
        problem = _format_problem(src, dst)
        for what, target in (("output", dst), ("preview", prev)):
            if target is not None:
                problem = problem or _target_problem(target, taken, inputs, overwrite, what)
        if problem:
            errors.append(printable(f"{src}: {problem}"))
            continue
        for target in filter(None, (dst, prev)):
            taken[target.resolve()] = src
        jobs.append(Job(src, dst, prev, overwrite))
    return jobs, errors


def _target_problem(
    target: Path, taken: dict[Path, Path], inputs: set[Path], overwrite: bool, what: str = "output"
) -> str | None:
    """Why `target` (the job's `what`: output or preview) cannot be written (None: it can): another source's
    output, an input or an existing file (unless `overwrite`), a folder, a folder it cannot write in, a name
    the file system refuses."""
    problem = _name_problem(target, what)
    if problem:
        return problem
    try:
        resolved = target.resolve()
        if resolved in taken:
            return f"{target} is also the output of {taken[resolved]}; use -o with a folder per source"
        if not overwrite and resolved in inputs:
            return f"{target} would overwrite an input; pass --overwrite to replace it"
        if target.is_dir():
            return f"{target} is a folder; name a file, or a folder with several inputs"
        # lexists: a dangling symlink is taken too (the final rename would refuse it after the work).
        if not overwrite and os.path.lexists(target):
            return f"{target} exists; pass --overwrite to replace it"
    except OSError as exc:  # ENAMETOOLONG: the whole path over PATH_MAX (names are checked above)
        return f"cannot check its {what} {target} ({exc.strerror or exc})"
    return write_problem(target)


def _format_problem(src: Path, dst: Path) -> str | None:
    suffix = dst.suffix.lower()
    if is_video(src):
        if suffix == ".avi":
            return f"-o {dst}: AVI cannot keep frame times or the audio's offset; write .mkv or .mp4"
        if suffix not in VIDEO_SAVE_SUFFIXES:
            return f"-o {dst}: a video is written as .mp4 (or .m4v, .mov, .mkv, .webm), not as '{suffix}'"
    elif suffix not in SAVE_SUFFIXES:
        return f"-o {dst}: unsupported image format '{suffix}' (use .png, .jpg, .webp, .tif, .bmp)"
    return None


def _nearest_folder(target: Path) -> Path:
    """The nearest folder above `target` that exists (or a file in the way); a name too long to look up is
    not there (os.path.exists: False on any error, where Path.exists raises ENAMETOOLONG)."""
    folder = target.parent
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _name_problem(target: Path, what: str) -> str | None:
    """A name in `target` longer than its file system takes (None: all fit). Below a folder still to be made,
    the file system says ENAMETOOLONG only when the finished file is renamed into place, after the work, so
    every name is measured here; the temporaries fit (files._temp_names shortens them)."""
    folder = _nearest_folder(target)
    limit, part = _name_max(folder), target
    while part != folder:
        size = len(os.fsencode(part.name))
        if size > limit and part != target:
            return f"its output folder's name ({size} bytes) is longer than the file system allows ({limit})"
        if size > limit:
            return (
                f"its {what} name ({size} bytes) is longer than the file system allows ({limit}); rename the "
                "input, or pass -o FOLDER (outputs there keep the input's name)"
            )
        part = part.parent
    return None


def write_problem(target: Path) -> str | None:
    """Why `target` cannot be created, judged from its nearest existing folder (None: it can)."""
    folder = _nearest_folder(target)
    if not folder.is_dir():
        return f"cannot create {target.parent}: {folder} is a file"
    try:  # a file without a name where the system allows it: tried, not guessed from the mode bits
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None
