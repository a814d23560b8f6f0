"""Reading and writing images: one place that knows about modes, bit depths and bad files.

Greyscale files are read as RGB (three equal channels) and marked `grey`, so a caller can write them back
as greyscale. 16-bit colour is read past Pillow (which decodes it at 8 bits) with OpenCV or tifffile where
they are installed (the pipeline's install has both); the light install reads it at 8 bits and says so.
16-bit greyscale and everything else needs only Pillow."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sharpkd.errors import UserError
from sharpkd.files import atomic_path

SIXTEEN_BIT_COLOUR = (
    "16-bit colour read as 8-bit (keeping 16 bits needs OpenCV: pip install opencv-python-headless)"
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
# Video files (what FFmpeg reads): sharpened by deploy/transcode.py, sampled for training by data/footage.py.
VIDEO_SUFFIXES = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".wmv",
        ".flv",
        ".ts",
        ".m2ts",
        ".mts",
        ".3gp",
        ".ogv",
    }
)


EXIF_ORIENTATION = 0x0112

# EXIF orientation -> the numpy equivalent of the transpose PIL's exif_transpose applies (HxWxC arrays).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


class ImageReadError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def printable(path: str | Path) -> str:
    """A file name as text that can be printed and stored anywhere: bytes that are not UTF-8
    (Python holds them as lone surrogates, which stdout, CSV and SQLite refuse) become \\xNN, and
    characters that are not printable (ESC sequences, newline, CR, tab, bidi overrides) are written as
    Python writes them in a string literal (\\x1b, \\n, \\u202e); everything printable is kept as it is."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class LoadedImage:
    rgb: np.ndarray  # HxWx3 uint8 (or uint16 when keep_16bit and the file is 16-bit)
    alpha: np.ndarray | None  # HxW, same dtype as rgb, when the file had alpha
    note: str  # what was converted, "" when nothing
    grey: bool = False  # the file is greyscale (its three channels are equal)

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8


# What Path.is_file() takes for "no such file" rather than an error (pathlib's own list).
_ABSENT = {errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP}


def list_files(
    folder: str | Path, suffixes: set[str], unreadable: list[tuple[Path, str]] | None = None
) -> list[Path]:
    """Files under `folder` (recursing, not into linked folders) whose suffix is one of `suffixes`, sorted:
    what `sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)` gives,
    except that a folder or entry that cannot be read (permissions) is skipped, never raised: it is
    appended to `unreadable` as (path, why), or said on stderr when no list is given."""
    found, todo, skipped = [], [Path(folder)], []
    while todo:
        here = todo.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as exc:
            skipped.append((here, f"cannot be read ({exc.strerror or exc})"))
            continue
        for entry in entries:
            path = here / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(path)
                elif path.suffix.lower() in suffixes and entry.is_file():
                    found.append(path)
            except OSError as exc:
                if exc.errno not in _ABSENT:
                    skipped.append((path, f"cannot be read ({exc.strerror or exc})"))
    if unreadable is None:
        for path, why in skipped:
            print(f"skipped {printable(path)}: {why}", file=sys.stderr)
    else:
        unreadable += skipped
    return sorted(found)


def list_images(folder: str | Path, unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Image files under `folder`, recursing, in a stable (sorted) order; entries that cannot be read
    are skipped (`list_files`)."""
    return list_files(folder, IMAGE_SUFFIXES, unreadable)


def list_image_folder(folder: str | Path, key: str) -> list[Path]:
    """list_images of the folder a params key names; a clear error when it is missing, a file or empty.
    Entries that cannot be read are skipped, each said in a line naming the key."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        # Queued DVC experiments run in a copy of the repository, where a relative path points elsewhere.
        raise UserError(f"params: '{key}' = {printable(folder)}: folder not found (use an absolute path)")
    if not folder.is_dir():
        raise UserError(f"params: '{key}' = {printable(folder)}: is not a folder")
    unreadable: list[tuple[Path, str]] = []
    files = list_images(folder, unreadable)
    for path, why in unreadable:
        print(f"[{key}] skipped {printable(path)}: {why}", file=sys.stderr)
    if not files:
        why = f"; {len(unreadable)} entries could not be read" if unreadable else ""
        raise UserError(
            f"params: '{key}' = {printable(folder)}: no images found (it holds no image files: "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}, searched recursively{why})"
        )
    return files


def load_image(path: str | Path, keep_16bit: bool = False) -> LoadedImage:
    """Decode any common image to RGB (+ alpha), honoring EXIF orientation.

    Grayscale is expanded to RGB, palette images are converted, 16-bit data is
    scaled to 8 bits unless `keep_16bit`. Raises ImageReadError naming the file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # Read before load(): Pillow's TIFF loader turns the pixels itself and drops the tag.
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
                deep_tiff = im.format == "TIFF" and max(_as_tuple(im.tag_v2.get(258, 8))) > 8
                frames = getattr(im, "n_frames", 1)
                im.load()
                im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageReadError(f"{printable(path)}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{printable(path)}: cannot decode image ({exc})") from None

    notes = []
    if frames > 1:
        notes.append(f"{frames} frames (animated or multi-page): only the first is used")
    if orientation in _ORIENT:
        notes.append(f"EXIF orientation {orientation} applied")
    else:
        orientation = 1
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        return _gray16_image(im, keep_16bit, notes)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        rgb = np.repeat(np.clip(arr, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
        notes.append("float grayscale converted to 8-bit RGB")
        return LoadedImage(rgb, None, "; ".join(notes), grey=True)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        return _image_with_alpha(im, path, orientation, deep_tiff, keep_16bit, notes)
    return _rgb_image(im, path, orientation, deep_tiff, keep_16bit, notes)


def _gray16_image(im: Image.Image, keep_16bit: bool, notes: list[str]) -> LoadedImage:
    """A 16-bit (or 32-bit integer) grayscale image as RGB, 16 bits kept or scaled to 8."""
    arr = np.asarray(im).astype(np.int64)
    peak = 65535 if im.mode != "I" or arr.max() > 255 else 255
    arr16 = np.clip(arr * (65535 // peak), 0, 65535).astype(np.uint16)
    rgb16 = np.repeat(arr16[..., None], 3, axis=2)
    notes.append("16-bit grayscale expanded to RGB")
    if keep_16bit:
        return LoadedImage(rgb16, None, "; ".join(notes), grey=True)
    notes.append("16-bit scaled to 8-bit")
    return LoadedImage(_to8(rgb16), None, "; ".join(notes), grey=True)


def _image_with_alpha(
    im: Image.Image, path: Path, orientation: int, deep_tiff: bool, keep_16bit: bool, notes: list[str]
) -> LoadedImage:
    """An image with transparency: RGB and alpha apart, 16 bits read past PIL when kept."""
    mode = im.mode
    arr = np.asarray(im.convert("RGBA"))
    alpha = arr[..., 3].copy()
    rgb = arr[..., :3].copy()
    notes.append(f"{mode} image: alpha channel separated")
    if mode in ("LA",):
        notes.append("grayscale expanded to RGB")
    # PIL reads 16-bit RGBA PNGs and TIFFs as 8-bit RGBA; OpenCV / tifffile keep the 16 bits.
    sixteen = mode == "RGBA" and (deep_tiff or _is_16bit_png(path))
    deep = _read_16bit_color(path) if sixteen and keep_16bit else None
    if deep is not None and deep.shape[2] == 4 and deep.shape[:2] in (rgb.shape[:2], rgb.shape[1::-1]):
        deep = _oriented(deep, orientation)
        return LoadedImage(deep[..., :3].copy(), deep[..., 3].copy(), "; ".join(notes))
    if sixteen:
        notes.append(
            SIXTEEN_BIT_COLOUR if keep_16bit and not _sixteen_bit_readers() else "16-bit scaled to 8-bit"
        )
    return LoadedImage(rgb, alpha, "; ".join(notes), grey=mode == "LA")


def _rgb_image(
    im: Image.Image, path: Path, orientation: int, deep_tiff: bool, keep_16bit: bool, notes: list[str]
) -> LoadedImage:
    """An image without transparency as RGB, 16 bits read past PIL when the file has them."""
    mode = im.mode
    grey = mode in ("L", "1")
    if mode != "RGB":
        if grey:
            notes.append("grayscale expanded to RGB")
        else:
            notes.append(f"{mode} converted to RGB")
        im = im.convert("RGB")
    rgb = np.asarray(im)
    # PIL decodes 16-bit RGB PNGs only as 8-bit "RGB"; 48-bit TIFF/PNG via OpenCV keeps 16 bits.
    deep = deep_tiff or _is_16bit_png(path)
    if keep_16bit or deep:
        rgb16 = _read_16bit_color(path)
        rgb16 = rgb16[..., :3] if rgb16 is not None else None
        if rgb16 is not None and rgb16.shape[:2] in (rgb.shape[:2], rgb.shape[1::-1]):
            rgb16 = _oriented(rgb16, orientation)
            if keep_16bit:
                return LoadedImage(rgb16, None, "; ".join(notes), grey)
            notes.append("16-bit scaled to 8-bit")
            rgb = _to8(rgb16)
        elif deep and keep_16bit and not _sixteen_bit_readers():
            notes.append(SIXTEEN_BIT_COLOUR)
    return LoadedImage(np.ascontiguousarray(rgb), None, "; ".join(notes), grey)


def _oriented(arr: np.ndarray, orientation: int) -> np.ndarray:
    """`arr` turned the way PIL turned its copy: OpenCV's IMREAD_UNCHANGED and tifffile ignore EXIF."""
    return np.ascontiguousarray(_ORIENT[orientation](arr) if orientation != 1 else arr)


def read_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """HxWx3 uint8 RGB and a note of what was converted (alpha dropped, 16 bits scaled...)."""
    img = load_image(path)
    note = img.note
    if img.alpha is not None:
        note = (note + "; " if note else "") + "alpha dropped"
    return img.rgb, note


def _to8(a16: np.ndarray) -> np.ndarray:
    return ((a16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, tuple | list) else (v,)


def _is_16bit_png(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(26)
    # PNG signature, then IHDR: bit depth at byte 24, colour type at byte 25 (2 = RGB, 6 = RGBA).
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[24] == 16 and head[25] in (2, 6)


def _sixteen_bit_readers() -> bool:
    """Whether OpenCV is installed (the pipeline's install): Pillow reads 48/64-bit colour only at 8 bits."""
    import importlib.util

    return importlib.util.find_spec("cv2") is not None


def _read_16bit_color(path: Path) -> np.ndarray | None:
    """HxWx3 uint16 RGB, or HxWx4 RGBA, as stored (no EXIF turning), or None (also without OpenCV). PIL
    reads 48/64-bit colour only as 8-bit."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile  # comes with scikit-image; OpenCV fails on TIFFs with an Orientation tag

            arr = tifffile.imread(path, key=0)
            if arr.dtype == np.uint16 and arr.ndim == 3 and arr.shape[2] in (3, 4):
                return np.ascontiguousarray(arr)
        except Exception:  # not installed, unusual compression or layout: let OpenCV try
            pass
    if not _sixteen_bit_readers():
        return None
    import cv2

    # Decoded from bytes read by Python: cv2.imread crashes the process (SIGSEGV) on a file name
    # that is not valid UTF-8.
    data = np.fromfile(path, dtype=np.uint8)
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    arr = cv2.imdecode(data, flags) if data.size else None
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        return None
    order = [2, 1, 0, 3][: arr.shape[2]]  # BGR(A) -> RGB(A)
    return np.ascontiguousarray(arr[..., order])


def save_image(
    path: str | Path,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    quality: int = 95,
    overwrite: bool = True,
) -> None:
    """Write uint8 or uint16 RGB (HxWx3) or greyscale (HxW), with alpha, atomically; the format follows the
    suffix. 16-bit colour needs OpenCV; 16-bit greyscale is written by Pillow.

    `overwrite=False`: FileExistsError if `path` exists when the file is complete (see atomic_path).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".webp": "WEBP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".bmp": "BMP",
    }.get(suffix)
    if fmt is None:
        raise UserError(
            f"{printable(path)}: unsupported output format '{suffix}' (use .png, .jpg, .webp, .tif)"
        )
    if rgb.dtype == np.uint16 and rgb.ndim == 3 and not _sixteen_bit_readers():
        raise UserError(
            f"{printable(path)}: writing 16-bit colour needs OpenCV: pip install opencv-python-headless"
        )
    with atomic_path(path, overwrite=overwrite) as tmp:
        if rgb.ndim == 2:
            _save_grey(tmp, fmt, rgb, alpha, quality)
            return
        if rgb.dtype == np.uint16:
            import cv2

            arr = rgb[..., ::-1]
            if alpha is not None:
                arr = np.concatenate([arr, alpha[..., None].astype(np.uint16)], axis=2)
            ext = ".png" if suffix not in (".tif", ".tiff") else ".tiff"
            ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr))
            if not ok:
                raise UserError(f"{printable(path)}: cannot encode a 16-bit image as {suffix}")
            tmp.write_bytes(buf.tobytes())
            return
        im = Image.fromarray(rgb, "RGB")
        if alpha is not None and suffix not in (".jpg", ".jpeg"):
            im.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
        kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        im.save(tmp, format=fmt, **kwargs)


def _save_grey(tmp: Path, fmt: str, grey: np.ndarray, alpha: np.ndarray | None, quality: int) -> None:
    """A greyscale image: mode L (LA with alpha), or I;16 for 16 bits (PNG and TIFF hold 16-bit grey)."""
    if grey.dtype == np.uint16:
        im = Image.fromarray(grey)  # I;16 (Pillow infers it from uint16; newer Pillow refuses the mode name)
    elif alpha is not None and fmt != "JPEG":
        im = Image.merge("LA", [Image.fromarray(grey, "L"), Image.fromarray(alpha.astype(np.uint8), "L")])
        im = im.convert("RGBA") if fmt == "BMP" else im  # BMP has no grey + alpha mode
    else:
        im = Image.fromarray(grey, "L")
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    im.save(tmp, format=fmt, **kwargs)
