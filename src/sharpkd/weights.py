"""Pretrained weight files: a local folder first, a verified download otherwise.

The folder is `weights.dir`, else $SHARPKD_WEIGHTS_DIR, else ~/.cache/sharpkd/weights.
A machine without internet is given the files there; a missing file is an error
that names the file, its URL and the folder, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tqdm import tqdm

from sharpkd.errors import UserError

_SWINIR = "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/001_classicalSR_DF2K_s64w8_SwinIR-M_x{s}.pth"
_PAN = "https://github.com/zhaohengyuan1/PAN/raw/master/experiments/pretrained_models/PANx{s}_DF2K.pth"
_PAN_SHA256 = {
    2: "fcf8ed48656abbaae46309ee91745684b80235a9c8b37a2d8fb0715a3ad3f00f",
    3: "86491751d73645a8816a0d6ec62ccde6b22ce5da930e36b3b87f5437167fbc89",
    4: "739fab99ee7b7058dab4d1b84aa2869bb9fc3995a1c08789c20355bee943833c",
}

# sha256 None = not pinned here (we could not obtain the official file to hash it):
# the file is still downloaded, its sha256 printed and recorded in teacher.json.
PRETRAINED: dict[str, dict] = {
    **{
        f"swinir_x{s}": {
            "filename": _SWINIR.format(s=s).rsplit("/", 1)[1],
            "url": _SWINIR.format(s=s),
            "sha256": None,
        }
        for s in (2, 3, 4)
    },
    **{
        f"pan_x{s}": {"filename": f"PANx{s}_DF2K.pth", "url": _PAN.format(s=s), "sha256": _PAN_SHA256[s]}
        for s in (2, 3, 4)
    },
}


def weights_dir(configured: str = "") -> Path:
    return Path(
        configured or os.environ.get("SHARPKD_WEIGHTS_DIR") or Path.home() / ".cache" / "sharpkd" / "weights"
    ).expanduser()


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(
    filename: str, url: str, sha256: str | None, folder: str | Path, timeout: float = 30.0
) -> Path:
    """`folder/filename`, downloaded from `url` if absent; sha256-verified when pinned."""
    import requests

    folder = Path(folder)
    path = folder / filename
    if path.is_file():
        if sha256 is None or sha256_of(path) == sha256:
            return path
        raise UserError(
            f"{path}: sha256 mismatch (expected {sha256}, got {sha256_of(path)}); delete it or replace it with the official file from {url}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get("Content-Length", 0)) or None
            with (
                open(part, "wb") as f,
                tqdm(total=total, unit="B", unit_scale=True, desc=f"download {filename}") as bar,
            ):
                for chunk in r.iter_content(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (requests.RequestException, OSError) as exc:
        part.unlink(missing_ok=True)
        raise UserError(
            f"weights file {filename} is not in {folder} and could not be downloaded from {url} "
            f"({type(exc).__name__}). Put the file in {folder} (or point weights.dir / SHARPKD_WEIGHTS_DIR at a folder holding it)."
        ) from None
    got = sha256_of(part)
    if sha256 is not None and got != sha256:
        part.unlink()
        raise UserError(
            f"{filename} from {url}: sha256 mismatch (expected {sha256}, got {got}); the download was removed"
        )
    if sha256 is None:
        print(f"[weights] {filename}: sha256 {got} (not pinned; recorded in teacher.json)")
    part.replace(path)
    return path
