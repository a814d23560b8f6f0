"""The `download` stage: HR images from data.source into data/raw/{train,valid}/ + manifest.csv.

samples  the colour photographs bundled with scikit-image (offline; the default)
folder   the user's own folders (recursive; PNG, JPEG, TIFF, WebP, BMP)
div2k    the official DIV2K zips: streamed with a progress bar, resumed with HTTP
         Range after an interruption, size and md5 verified, cached in
         data.div2k.cache_dir so a verified zip is never fetched twice.
"""

from __future__ import annotations

import hashlib
import zipfile
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
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry")

# name -> (zip file, expected bytes or None, md5); tests point base_url at a local server and patch this.
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
            for name, loader in tqdm(list(items), desc=f"download: {split}", unit="img"):
                try:
                    rgb, note = loader()
                except ImageReadError as exc:
                    print(f"[download] skipped {exc}")
                    skipped.append(str(exc))
                    continue
                if note:
                    print(f"[download] {name}: {note}")
                name = _unique(name, used)
                path = tmp / split / f"{name}.png"
                save_image(path, rgb)
                rows.append({
                    "split": split, "source": source, "name": name, "width": rgb.shape[1], "height": rgb.shape[0],
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "note": note,
                })  # fmt: skip
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "valid")}
        for split, count in counts.items():
            if count == 0:
                raise UserError(f"data.source={source}: no usable {split} image (skipped {len(skipped)} unreadable files)")
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    print(f"[download] {counts['train']} train, {counts['valid']} valid images from {source}; {len(skipped)} skipped")
    if tracker is not None:
        tracker.log_metrics({"download.train_images": counts["train"], "download.valid_images": counts["valid"], "download.skipped": len(skipped)})
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
        raise UserError(f"params: 'data.samples.valid_count' must be less than {len(order)} (the number of sample photos)")
    return {
        "train": [(p, loader(p)) for p in sorted(order[k:])],
        "valid": [(p, loader(p)) for p in sorted(order[:k])],
    }


def _folder_items(folder: Path, key: str) -> list:
    if not folder.is_dir():
        raise UserError(f"params: '{key}' = {folder}: folder not found")
    files = list_images(folder)
    if not files:
        raise UserError(f"params: '{key}' = {folder}: no images found (looked for PNG, JPEG, TIFF, WebP, BMP, recursively)")
    # Subfolders become part of the name so two photos called 1.png in different folders both survive.
    return [("__".join(f.relative_to(folder).with_suffix("").parts), (lambda f=f: read_rgb(f))) for f in files]


def _folder(params: Params) -> dict:
    """Train from data.folder.train; valid from data.folder.valid, or else every 10th train image (at least one)."""
    train = _folder_items(Path(params.data.folder.train), "data.folder.train")
    if params.data.folder.valid:
        return {"train": train, "valid": _folder_items(Path(params.data.folder.valid), "data.folder.valid")}
    if len(train) < 2:
        raise UserError("data.folder.train needs at least 2 images when data.folder.valid is empty")
    held = set(range(0, len(train), 10))
    return {"train": [t for i, t in enumerate(train) if i not in held], "valid": [t for i, t in enumerate(train) if i in held]}


def _div2k(params: Params) -> dict:
    cfg = params.data.div2k
    cache = Path(cfg.cache_dir)
    out = {}
    for split, count in (("train", cfg.train_count), ("valid", cfg.valid_count)):
        filename, size, md5 = DIV2K_ZIPS[split]
        zip_path = fetch(cfg.base_url.rstrip("/") + "/" + filename, cache / filename, size, md5)
        out[split] = list(_zip_images(zip_path, count))
    return out


def _zip_images(zip_path: Path, count: int) -> Iterator:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        zip_path.unlink(missing_ok=True)
        raise DownloadError(f"{zip_path}: not a valid zip ({exc}); removed, run again to download it anew") from None
    if bad is not None:
        zip_path.unlink(missing_ok=True)
        raise DownloadError(f"{zip_path}: member {bad} is corrupt; removed, run again to download it anew")
    if not names:
        raise DownloadError(f"{zip_path}: contains no PNG images")

    def loader(member):
        def load():
            import io

            from PIL import Image

            with zipfile.ZipFile(zip_path) as zf:
                data = zf.read(member)
            tmp = io.BytesIO(data)
            try:
                Image.open(tmp).verify()
            except Exception as exc:
                raise ImageReadError(f"{zip_path}:{member}: cannot decode image ({exc})") from None
            return _decode_bytes(data, f"{zip_path}:{member}")

        return load

    for member in names[:count]:
        yield Path(member).stem, loader(member)


def _decode_bytes(data: bytes, label: str):
    import tempfile

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


def fetch(url: str, dest: Path, size: int | None, md5: str, timeout: float = 30.0, attempts: int = 5) -> Path:
    """Download `url` to `dest` (resuming a `.part` file with HTTP Range), verify size and md5."""
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if md5_of(dest) == md5:
            print(f"[download] {dest} already downloaded and verified")
            return dest
        print(f"[download] {dest} does not match its md5; downloading again")
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    last_error = None
    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # nothing left to fetch
                    break
                if r.status_code not in (200, 206):
                    raise DownloadError(f"{url}: HTTP {r.status_code}")
                if have and r.status_code == 200:  # server ignored Range: start over
                    have = 0
                total = int(r.headers.get("Content-Length", 0)) + have or size
                with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=f"download {dest.name}"
                ) as bar:
                    for chunk in r.iter_content(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
            if size is None or part.stat().st_size >= size:
                break
            last_error = f"connection closed at {part.stat().st_size} of {size} bytes"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error = str(exc)
            print(f"[download] {dest.name}: interrupted ({type(exc).__name__}); resuming")
    else:
        raise DownloadError(f"{url}: download failed after {attempts} attempts ({last_error}); partial file kept at {part} for resuming")

    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink()
        raise DownloadError(f"{url}: expected {size} bytes, got {got_size}; the partial file was removed")
    got = md5_of(part)
    if got != md5:
        part.unlink()
        raise DownloadError(f"{dest.name}: md5 mismatch (expected {md5}, got {got}); the file was removed")
    part.replace(dest)
    return dest
