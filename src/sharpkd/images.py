"""Reading and writing images: one place that knows about modes, bit depths and bad files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sharpkd.errors import UserError
from sharpkd.files import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


class ImageReadError(UserError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass
class LoadedImage:
    rgb: np.ndarray  # HxWx3 uint8 (or uint16 when keep_16bit and the file is 16-bit)
    alpha: np.ndarray | None  # HxW, same dtype as rgb, when the file had alpha
    note: str  # what was converted, "" when nothing

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursing, in a stable (sorted) order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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
                im.load()
                im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from None

    notes = []
    mode = im.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(im).astype(np.int64)
        peak = 65535 if mode != "I" or arr.max() > 255 else 255
        arr16 = np.clip(arr * (65535 // peak), 0, 65535).astype(np.uint16)
        rgb16 = np.repeat(arr16[..., None], 3, axis=2)
        notes.append("16-bit grayscale expanded to RGB")
        rgb = rgb16 if keep_16bit else _to8(rgb16)
        if not keep_16bit:
            notes.append("16-bit scaled to 8-bit")
        return LoadedImage(rgb, None, "; ".join(notes))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        rgb = np.repeat(np.clip(arr, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
        return LoadedImage(rgb, None, "float grayscale converted to 8-bit RGB")

    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        arr = np.asarray(im)
        alpha = arr[..., 3].copy()
        rgb = arr[..., :3].copy()
        notes.append(f"{mode} image: alpha channel separated")
        if mode in ("LA",):
            notes.append("grayscale expanded to RGB")
        return LoadedImage(rgb, alpha, "; ".join(notes))
    if mode != "RGB":
        if mode in ("L", "1"):
            notes.append("grayscale expanded to RGB")
        else:
            notes.append(f"{mode} converted to RGB")
        im = im.convert("RGB")
    rgb = np.asarray(im)
    # PIL decodes 16-bit RGB PNGs only as 8-bit "RGB"; 48-bit TIFF/PNG via OpenCV keeps 16 bits.
    if keep_16bit or _is_16bit_color(path):
        rgb16 = _read_16bit_color(path)
        if rgb16 is not None:
            if keep_16bit:
                return LoadedImage(rgb16, alpha, "; ".join(notes))
            notes.append("16-bit scaled to 8-bit")
            rgb = _to8(rgb16)
    return LoadedImage(np.ascontiguousarray(rgb), alpha, "; ".join(notes))


def read_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """HxWx3 uint8 RGB and a note of what was converted (alpha dropped, 16 bits scaled...)."""
    img = load_image(path)
    note = img.note
    if img.alpha is not None:
        note = (note + "; " if note else "") + "alpha dropped"
    return img.rgb, note


def _to8(a16: np.ndarray) -> np.ndarray:
    return ((a16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _is_16bit_color(path: Path) -> bool:
    if path.suffix.lower() == ".png":
        with path.open("rb") as f:
            head = f.read(26)
        # PNG IHDR: bit depth at byte 24, colour type at byte 25 (2 = RGB, 6 = RGBA).
        return len(head) == 26 and head[24] == 16 and head[25] in (2, 6)
    return path.suffix.lower() in (".tif", ".tiff")


def _read_16bit_color(path: Path) -> np.ndarray | None:
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    arr = arr[..., :3][..., ::-1]  # BGR(A) -> RGB
    return np.ascontiguousarray(arr)


def save_image(path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None, quality: int = 95) -> None:
    """Write uint8 or uint16 RGB(+alpha) atomically; the format follows the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if rgb.dtype == np.uint16:
            import cv2

            arr = rgb[..., ::-1]
            if alpha is not None:
                arr = np.concatenate([arr, alpha[..., None].astype(np.uint16)], axis=2)
            ext = ".png" if suffix not in (".tif", ".tiff") else ".tiff"
            ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr))
            if not ok:
                raise UserError(f"{path}: cannot encode a 16-bit image as {suffix}")
            tmp.write_bytes(buf.tobytes())
            return
        im = Image.fromarray(rgb, "RGB")
        if alpha is not None and suffix not in (".jpg", ".jpeg"):
            im.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}.get(suffix)
        if fmt is None:
            raise UserError(f"{path}: unsupported output format '{suffix}' (use .png, .jpg, .webp, .tif)")
        kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        im.save(tmp, format=fmt, **kwargs)
