"""Where HR images come from (data.source); the download stage (stages/download.py) writes them.

`source_images(params)` -> {split: [(name, origin, loader)]}, each loader returning (rgb uint8, note):

samples  the colour photographs bundled with scikit-image (offline; the default)
folder   the user's own folders (recursive; PNG, JPEG, TIFF, WebP, BMP)
div2k    the official DIV2K zips: streamed with a progress bar, resumed with HTTP
         Range after an interruption, size and md5 verified, cached in
         data.div2k.cache_dir so a verified zip is never fetched twice.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from sharpkd.config import Params
from sharpkd.deploy.images import ImageReadError, list_image_folder, printable, read_rgb
from sharpkd.errors import UserError
from sharpkd.fetch import DownloadError, download

# scikit-image's bundled colour photographs that load without a download.
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
)

# split -> (zip file, expected bytes or None, md5), as the DIV2K site lists them (no size is given for the valid zip:
# its md5 alone verifies it). Tests point base_url at a local server and patch this.
DIV2K_ZIPS = {
    "train": ("DIV2K_train_HR.zip", 3_530_603_713, "bdc2d9338d4e574fe81bf7d158758658"),
    "valid": ("DIV2K_valid_HR.zip", None, "9fcdda83005c5e5997799b69f955ff88"),
}


def source_images(params: Params) -> dict[str, list]:
    return {"samples": _samples, "folder": _folder, "div2k": _div2k}[params.data.source](params)


def _samples(params: Params) -> dict:
    import skimage.data

    def loader(photo):
        def load():
            img = getattr(skimage.data, photo)()
            img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
            return np.ascontiguousarray(img[..., :3]), ""

        return load

    order = list(SAMPLE_PHOTOS)
    np.random.default_rng(params.seed).shuffle(order)
    k = params.data.samples.valid_count
    if k >= len(order):
        raise UserError(
            f"params: 'data.samples.valid_count' must be less than {len(order)} (the number of sample photos)"
        )
    return {
        "train": [(p, f"skimage.data.{p}", loader(p)) for p in sorted(order[k:])],
        "valid": [(p, f"skimage.data.{p}", loader(p)) for p in sorted(order[:k])],
    }


def _folder_items(folder: Path, key: str) -> list:
    files = list_image_folder(folder, key)
    # Subfolders become part of the name so two photos called 1.png in different folders both survive;
    # names that are not UTF-8 are written escaped (manifest.csv and DVC want text).
    return [
        (
            printable("__".join(f.relative_to(folder).with_suffix("").parts)),
            printable(f),
            (lambda f=f: read_rgb(f)),
        )
        for f in files
    ]


def _folder(params: Params) -> dict:
    """Train from data.folder.train; valid from data.folder.valid, or else every 10th train image (at least one)."""
    train = _folder_items(Path(params.data.folder.train), "data.folder.train")
    if params.data.folder.valid:
        return {"train": train, "valid": _folder_items(Path(params.data.folder.valid), "data.folder.valid")}
    if len(train) < 2:
        raise UserError("data.folder.train needs at least 2 images when data.folder.valid is empty")
    held = set(range(0, len(train), 10))
    return {
        "train": [t for i, t in enumerate(train) if i not in held],
        "valid": [t for i, t in enumerate(train) if i in held],
    }


def _div2k(params: Params) -> dict:
    """Fetch (or reuse from the cache) both zips, verified, then take the first N images of each (sorted names)."""
    cfg = params.data.div2k
    cache = Path(cfg.cache_dir)
    out = {}
    for split, count in (("train", cfg.train_count), ("valid", cfg.valid_count)):
        filename, size, md5 = DIV2K_ZIPS[split]
        zip_path = download(cfg.base_url.rstrip("/") + "/" + filename, cache / filename, size, ("md5", md5))
        out[split] = _zip_images(zip_path, count, f"data.div2k.{split}_count")
    return out


# What a damaged zip raises: a missing central directory, a short member, a bad CRC, a broken deflate stream.
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)


def _remove_bad_zip(zip_path: Path, what: str) -> DownloadError:
    zip_path.unlink(missing_ok=True)
    return DownloadError(f"{zip_path}: {what}; the zip was removed, run again to download it anew")


def _zip_images(zip_path: Path, count: int, key: str) -> list:
    """(name, origin, loader) for the first `count` PNG members in sorted order; members are read lazily."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(
                n for n in zf.namelist() if n.lower().endswith(".png") and not n.startswith("__MACOSX/")
            )
    except _ZIP_ERRORS as exc:
        raise _remove_bad_zip(zip_path, f"not a valid zip ({exc})") from None
    if not names:
        raise DownloadError(f"{zip_path}: contains no PNG images")
    if count > len(names):
        print(
            f"[download] {key} = {count}, but {zip_path.name} holds {len(names)} PNG images; using all of them"
        )

    def loader(member):
        def load():
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    data = zf.read(member)  # checks the member's CRC
            except _ZIP_ERRORS as exc:
                # The zip passed its md5, so the damage is on disk: stop rather than build a partial dataset.
                raise _remove_bad_zip(zip_path, f"member {member} is corrupt ({exc})") from None
            return _decode_bytes(data, f"{zip_path}:{member}")

        return load

    return [(Path(m).stem, f"{zip_path.name}:{m}", loader(m)) for m in names[:count]]


def _decode_bytes(data: bytes, label: str):
    import tempfile

    # read_rgb works on files (bit depth sniffing, OpenCV for 16 bits), hence the temporary file.
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(data)
        f.flush()
        try:
            return read_rgb(f.name)
        except ImageReadError as exc:
            raise ImageReadError(f"{label}: {str(exc).split(': ', 1)[-1]}") from None
