"""The `download` stage: HR images from data.source into data/raw/{train,valid}/ + manifest.csv.

samples  the colour photographs bundled with scikit-image (offline; the default)
folder   the user's own folders (recursive; PNG, JPEG, TIFF, WebP, BMP)
div2k    the official DIV2K zips: streamed with a progress bar, resumed with HTTP
         Range after an interruption, size and md5 verified, cached in
         data.div2k.cache_dir so a verified zip is never fetched twice.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from sharpkd.config import Params
from sharpkd.errors import UserError
from sharpkd.files import atomic_dir
from sharpkd.images import ImageReadError, list_images, read_rgb, save_image

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

# split -> (zip file, expected bytes or None, md5), as in DESIGN.md (which gives no size for the valid zip:
# its md5 alone verifies it). Tests point base_url at a local server and patch this.
DIV2K_ZIPS = {
    "train": ("DIV2K_train_HR.zip", 3_530_603_713, "bdc2d9338d4e574fe81bf7d158758658"),
    "valid": ("DIV2K_valid_HR.zip", None, "9fcdda83005c5e5997799b69f955ff88"),
}


class DownloadError(UserError):
    pass


def build_raw_dataset(params: Params, out_dir="data/raw", tracker=None) -> dict:
    source = params.data.source
    if source == "samples":
        splits = _samples(params)
    elif source == "folder":
        splits = _folder(params)
    else:
        splits = _div2k(params)

    rows, skipped = [], []
    with atomic_dir(out_dir) as tmp:
        for split, items in splits.items():
            used = set()
            for name, origin, loader in tqdm(list(items), desc=f"download: {split}", unit="img"):
                try:
                    rgb, note = loader()
                except ImageReadError as exc:
                    print(f"[download] skipped {exc}")
                    skipped.append(str(exc))
                    continue
                if note:
                    print(f"[download] {origin}: converted ({note})")
                name = _unique(name, used)
                path = tmp / split / f"{name}.png"
                save_image(path, rgb)
                rows.append({
                    "split": split, "source": source, "name": name, "origin": origin,
                    "width": rgb.shape[1], "height": rgb.shape[0],
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "note": note,
                })  # fmt: skip
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "valid")}
        for split, count in counts.items():
            if count == 0:
                raise UserError(
                    f"data.source={source}: no usable {split} image (skipped {len(skipped)} unreadable files); "
                    f"nothing was written to {out_dir}"
                )
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    print(
        f"[download] {counts['train']} train, {counts['valid']} valid images from {source}; {len(skipped)} unreadable skipped"
    )
    if tracker is not None:
        tracker.log_metrics(
            {
                "download.train_images": counts["train"],
                "download.valid_images": counts["valid"],
                "download.skipped": len(skipped),
            }
        )
    return {**counts, "skipped": skipped}


def _unique(name: str, used: set[str]) -> str:
    base, k = name, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


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
    if not folder.is_dir():
        raise UserError(f"params: '{key}' = {folder}: folder not found")
    files = list_images(folder)
    if not files:
        raise UserError(
            f"params: '{key}' = {folder}: no images found (looked for PNG, JPEG, TIFF, WebP, BMP, recursively)"
        )
    # Subfolders become part of the name so two photos called 1.png in different folders both survive.
    return [
        ("__".join(f.relative_to(folder).with_suffix("").parts), str(f), (lambda f=f: read_rgb(f)))
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
        zip_path = fetch(cfg.base_url.rstrip("/") + "/" + filename, cache / filename, size, md5)
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


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _range_start(response) -> int | None:
    """First byte of a 206 answer, from `Content-Range: bytes START-END/TOTAL`."""
    value = response.headers.get("Content-Range", "")
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _body_chunks(response) -> Iterator[bytes]:
    """The body as it arrives. `read1` hands over what is there, so a dropped connection loses none of
    the bytes already received (iter_content drops its partly filled chunk: those would be fetched twice)."""
    raw = response.raw
    if hasattr(raw, "read1"):  # urllib3 >= 2
        while chunk := raw.read1(1 << 16, decode_content=True):
            yield chunk
    else:
        yield from response.iter_content(1 << 16)


def fetch(url: str, dest: Path, size: int | None, md5: str, timeout: float = 30.0, attempts: int = 5) -> Path:
    """Download `url` to `dest`, verified; return `dest`.

    A verified `dest` already there is reused without any request. Bytes go to
    `dest.part`; after an interruption the next attempt (or the next run) asks for
    the rest with an HTTP Range request. Size and md5 are checked on the `.part`
    before it is renamed to `dest`, so `dest` only ever holds a verified file.
    """
    import requests
    import urllib3

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if (size is None or dest.stat().st_size == size) and md5_of(dest) == md5:
            print(f"[download] {dest} is in the download cache (size and md5 verified); not fetched again")
            return dest
        print(f"[download] {dest} does not match the expected size/md5; removed, downloading it again")
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the file: not a prefix of it
    last_error = None
    for attempt in range(attempts):
        if attempt > 1:
            time.sleep(min(2.0 * (attempt - 1), 10.0))  # resume a cut connection at once, then back off
        have = part.stat().st_size if part.exists() else 0
        # identity: byte ranges and the md5 refer to the file itself, not to a gzip of it.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416 and have:  # nothing left to fetch: the .part holds the whole file
                    break
                if r.status_code not in (200, 206):
                    raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
                if r.status_code == 206 and _range_start(r) != have:
                    part.unlink()
                    last_error = f"asked for bytes from {have}, got {r.headers.get('Content-Range')!r}"
                    continue
                if r.status_code == 200 and have:
                    print(
                        f"[download] {url}: the server does not support resuming; downloading from the start"
                    )
                    have = 0
                length = r.headers.get("Content-Length")
                total = int(length) + have if length else size
                with (
                    open(part, "ab" if have else "wb") as f,
                    tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=f"download {dest.name}"
                    ) as bar,
                ):
                    for chunk in _body_chunks(r):
                        f.write(chunk)
                        bar.update(len(chunk))
            # A response without Content-Length that ended early looks complete to requests: keep resuming.
            if length is None and size is not None and part.stat().st_size < size:
                last_error = f"connection closed at {part.stat().st_size} of {size} bytes"
                continue
            break
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
        ) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
            got = part.stat().st_size if part.exists() else 0
            print(
                f"[download] {dest.name}: interrupted at {got} bytes ({type(exc).__name__}); resuming with HTTP Range"
            )
    else:
        raise DownloadError(
            f"{url}: download failed after {attempts} attempts ({last_error}); "
            f"the partial file {part} is kept, run again to resume"
        )

    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink()
        raise DownloadError(f"{url}: expected {size} bytes, got {got_size}; the downloaded file was removed")
    got = md5_of(part)
    if got != md5:
        part.unlink()
        raise DownloadError(
            f"{url}: md5 mismatch (expected {md5}, got {got}); the downloaded file was removed"
        )
    part.replace(dest)
    print(f"[download] {dest} downloaded, size and md5 verified")
    return dest
