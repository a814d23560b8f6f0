"""Finding, downloading and verifying files: one module, one hash helper.

- `file_digest(path, algo)`: the hash of a file, read in chunks (sha256 by default).
- `download(url, dest, size, digest)`: a resumable, verified HTTP download (DIV2K zips, weights).
- `resolve_weights_dir(configured)`: the folder for pretrained weights: `weights.dir`, else
  $SHARPKD_WEIGHTS_DIR, else ~/.cache/sharpkd/weights.
- `find_file(name, folders)`: the first folder holding `name`.
- `fetch_weights(filename, url, sha256, folder)`: a weights file from the folder, else downloaded.
- `find_or_download(filename, url, digest, folders)`: a file from the first of several folders holding
  it, else downloaded (verified) into the first writable one (VGG19: weights.dir, then torch's hub cache).
- `network_reason(exc)`: why a request failed, in a few words (DNS failure, connection refused, timed out).
- `check_pretrained(params)`: check_params' check that every pretrained file the params need is there
  (verified) or its server answers, before any stage deletes an output.

A machine without internet is given the files in the weights folder; a missing file is an
error that names the file, its URL and the folder, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sharpkd.errors import UserError, brief
from sharpkd.progress import progress

if TYPE_CHECKING:
    from sharpkd.config import Params

_SWINIR = "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/001_classicalSR_DF2K_s64w8_SwinIR-M_x{s}.pth"
_PAN = "https://github.com/zhaohengyuan1/PAN/raw/master/experiments/pretrained_models/PANx{s}_DF2K.pth"
_PAN_SHA256 = {
    2: "fcf8ed48656abbaae46309ee91745684b80235a9c8b37a2d8fb0715a3ad3f00f",
    3: "86491751d73645a8816a0d6ec62ccde6b22ce5da930e36b3b87f5437167fbc89",
    4: "739fab99ee7b7058dab4d1b84aa2869bb9fc3995a1c08789c20355bee943833c",
}
# DCTLSA (Zeng et al.; Apache-2.0), the authors' files at the commit that added them; saved as plain
# state dicts on a CUDA device (spandrel loads them onto the CPU). Stored locally under a name that
# says what they are (their own names are X2.pt, X3.pt, X4.pt).
_DCTLSA = (
    "https://github.com/zengkun301/DCTLSA/raw/f8bb3bbc3d2f98633cadf8e2f5f326c31f3bd5db/pretrained/X{s}.pt"
)
_DCTLSA_SHA256 = {
    2: "df08c0b6dc0a034c63b6d425586ac3c13ed227db75bb0282b012b4220e943eb9",
    3: "4af9979200d385177ea5284215f144a85cebf5037014af164b1efe5a5beea86d",
    4: "58d822beb3a1bf1d3e5dc91371a5686debda6bdbf246a4484805bda37cb18c06",
}

# torchvision's ImageNet VGG19 (VGG19_Weights.IMAGENET1K_V1), for loss.perceptual.
_VGG19 = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

# sha256 None = not pinned here (we could not obtain the official file to hash it):
# the file is still downloaded, its sha256 printed and recorded in teacher.json.
# A sha256 may be a prefix of the digest: torchvision publishes no full digest, only the first 8 hex
# digits in the file name ("vgg19-dcbb9e9d.pth"); that prefix is "torchvision's hash", checked the
# way torch.hub's `check_hash` checks it (the file's sha256 starts with it).
# The entries are read when a file is needed, so tests point "url"/"sha256" at a local server.
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
    **{
        f"dctlsa_x{s}": {
            "filename": f"DCTLSA_X{s}.pt",
            "url": _DCTLSA.format(s=s),
            "sha256": _DCTLSA_SHA256[s],
        }
        for s in (2, 3, 4)
    },
    "vgg19": {"filename": _VGG19.rsplit("/", 1)[1], "url": _VGG19, "sha256": "dcbb9e9d"},
}


class DownloadError(UserError):
    """A download that failed; `reason` is what happened in a few words (the message adds the URL)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it wraps: requests and urllib3 nest the socket's error two or three deep
    (as an argument, as MaxRetryError.reason, as the cause)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        inner = [*e.args, getattr(e, "reason", None), e.__cause__, e.__context__]
        todo += [x for x in inner if isinstance(x, BaseException)]
    return seen


def network_reason(exc: BaseException, url: str = "") -> tuple[str, bool]:
    """(what happened, in a few words, whether trying again can help) for an error of a request to `url`."""
    import requests
    import urllib3

    causes = _causes(exc)
    host = urlsplit(url).hostname or "the server"
    where = urlsplit(url).netloc or host

    def has(*types) -> bool:
        return any(isinstance(e, types) for e in causes)

    if has(
        requests.exceptions.ProxyError, urllib3.exceptions.ProxyError
    ):  # before: it wraps the proxy's error
        return f"proxy for {host} unreachable", False
    if has(socket.gaierror, urllib3.exceptions.NameResolutionError):
        return f"DNS failure for {host}", False  # retrying in seconds resolves nothing
    if has(ConnectionRefusedError):
        return f"connection refused by {where}", False
    if has(ssl.SSLError, requests.exceptions.SSLError):
        cert = next((e for e in causes if isinstance(e, ssl.SSLCertVerificationError)), None)
        return f"TLS error with {host}" + (f" ({cert.verify_message})" if cert else ""), False
    connect_timeout = any(
        isinstance(e, urllib3.exceptions.ConnectTimeoutError)
        and not isinstance(e, urllib3.exceptions.NewConnectionError)  # a subclass, for any connect failure
        for e in causes
    )
    if connect_timeout or has(TimeoutError, requests.Timeout, urllib3.exceptions.ReadTimeoutError):
        return f"{where} timed out", True
    if has(ConnectionResetError, urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError):
        return f"connection to {where} dropped", True
    errno = next((e for e in causes if isinstance(e, OSError) and e.errno and e.strerror), None)
    if errno is not None:  # network unreachable, no route to host...
        return f"{errno.strerror[:1].lower()}{errno.strerror[1:]} ({where})", True
    return f"{type(exc).__name__}: {brief(str(exc), 80)}", True


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights_dir(configured: str = "") -> Path:
    return Path(
        configured or os.environ.get("SHARPKD_WEIGHTS_DIR") or Path.home() / ".cache" / "sharpkd" / "weights"
    ).expanduser()


def without_home(text: str) -> str:
    """`text` with the user's home folder written as `~`: messages kept in outputs (eval.json, the
    model card, MLflow) must not carry the account's absolute paths."""
    home = str(Path.home())
    return text.replace(home, "~") if len(home) > 1 else text


def find_file(name: str, folders: Iterable[str | Path]) -> Path | None:
    for folder in folders:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _matches(path: Path, size: int | None, digest: tuple[str, str] | None) -> tuple[bool, str]:
    """(ok, what is wrong). A digest may be a prefix (torchvision names carry sha256 prefixes)."""
    if size is not None and path.stat().st_size != size:
        return False, f"expected {size} bytes, got {path.stat().st_size}"
    if digest is not None:
        algo, expected = digest
        got = file_digest(path, algo)
        if not got.startswith(expected):
            return False, f"{algo} mismatch (expected {expected}, got {got})"
    return True, ""


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


def download(
    url: str,
    dest: str | Path,
    size: int | None = None,
    digest: tuple[str, str] | None = None,
    timeout: float = 30.0,
    attempts: int = 5,
) -> Path:
    """Download `url` to `dest`, verified (size, and `digest` = (algo, hex or hex prefix)); return `dest`.

    A verified `dest` already there is reused without any request. Bytes go to
    `dest.part`; after an interruption the next attempt (or the next run) asks for
    the rest with an HTTP Range request. Size and digest are checked on the `.part`
    before it is renamed to `dest`, so `dest` only ever holds a verified file.
    """
    import requests
    import urllib3

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if _matches(dest, size, digest)[0]:
            print(f"[download] {dest} is already there (verified); not fetched again")
            return dest
        print(f"[download] {dest} does not match the expected size/digest; removed, downloading it again")
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the file: not a prefix of it
    last_error = None
    for attempt in range(attempts):
        if attempt > 1:
            time.sleep(min(2.0 * (attempt - 1), 10.0))  # resume a cut connection at once, then back off
        try:
            last_error = _fetch_rest(url, dest, part, size, timeout)
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
        ) as exc:
            last_error, retry = network_reason(exc, url)
            if not retry:
                raise DownloadError(f"{url}: {last_error}{_kept(part)}", last_error) from None
            if attempt + 1 < attempts:  # (after the last one, the error below says it)
                got = part.stat().st_size if part.exists() else 0
                then = f"interrupted at {got} bytes ({last_error}); resuming with HTTP Range"
                print(f"[download] {dest.name}: {then if got else f'{last_error}; trying again'}")
            continue
        if last_error is None:
            break
    else:
        raise DownloadError(
            f"{url}: download failed after {attempts} attempts ({last_error}){_kept(part)}", last_error
        )

    ok, why = _matches(part, size, digest)
    if not ok:
        part.unlink()
        raise DownloadError(f"{url}: {why}; the downloaded file was removed", why.split(" (", 1)[0])
    part.replace(dest)
    print(f"[download] {dest} downloaded" + (", verified" if size is not None or digest else ""))
    return dest


def _kept(part: Path) -> str:
    return f"; the partial file {part} is kept, run again to resume" if part.exists() else ""


def _fetch_rest(url: str, dest: Path, part: Path, size: int | None, timeout: float) -> str | None:
    """One request appending what `part` lacks of `url`: None when it is whole, else why to try again.

    DownloadError on an HTTP error; a dropped connection raises what requests raises.
    """
    import requests

    have = part.stat().st_size if part.exists() else 0
    # identity: byte ranges and the digest refer to the file itself, not to a gzip of it.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and have:  # nothing left to fetch: the .part holds the whole file
            return None
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}", f"HTTP {r.status_code} {r.reason}")
        if r.status_code == 206 and _range_start(r) != have:
            part.unlink()
            return f"asked for bytes from {have}, got {r.headers.get('Content-Range')!r}"
        if r.status_code == 200 and have:
            print(f"[download] {url}: the server does not support resuming; downloading from the start")
            have = 0
        length = r.headers.get("Content-Length")
        total = int(length) + have if length else size
        with (
            open(part, "ab" if have else "wb") as f,
            progress(
                total=total, initial=have, unit="B", unit_scale=True, desc=f"download {dest.name}"
            ) as bar,
        ):
            for chunk in _body_chunks(r):
                f.write(chunk)
                bar.update(len(chunk))
    # A response without Content-Length that ended early looks complete to requests: keep resuming.
    if length is None and size is not None and part.stat().st_size < size:
        return f"connection closed at {part.stat().st_size} of {size} bytes"
    return None


def fetch_weights(
    filename: str, url: str, sha256: str | None, folder: str | Path, timeout: float = 30.0
) -> Path:
    """`folder/filename`, downloaded from `url` if absent; sha256-verified (digest or prefix) when pinned."""
    folder = Path(folder)
    path = folder / filename
    if path.is_file():
        if sha256 is None or file_digest(path).startswith(sha256):
            return path
        raise UserError(
            f"{path}: sha256 mismatch (expected {sha256}, got {file_digest(path)}); delete it or replace it with the official file from {url}"
        )
    try:
        download(url, path, digest=("sha256", sha256) if sha256 else None, timeout=timeout, attempts=2)
    except DownloadError as exc:
        raise UserError(
            f"weights file {filename} is not in {folder} and could not be downloaded ({exc}). "
            f"Put the file in {folder} (or point weights.dir / SHARPKD_WEIGHTS_DIR at a folder holding it)."
        ) from None
    if sha256 is None:
        print(f"[weights] {filename}: sha256 {file_digest(path)} (not pinned; recorded in teacher.json)")
    return path


def writable_folder(folders: Iterable[str | Path]) -> Path | None:
    """The first of `folders` that exists (created if need be) and can be written to; None if none can."""
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    return None


def find_or_download(
    filename: str,
    url: str,
    digest: tuple[str, str] | None,
    folders: Iterable[str | Path],
    timeout: float = 30.0,
    attempts: int = 2,
) -> Path:
    """`filename` from the first of `folders` holding it, used as it is (a file put there by hand, or one
    this function downloaded and verified: torch.hub trusts its cache the same way); else downloaded
    with `download` (resumable, retried, verified against `digest` before it gets its name) into the
    first writable folder. DownloadError when none is writable, the download fails or does not verify
    (then nothing is kept under `filename`)."""
    folders = [Path(f) for f in folders]
    found = find_file(filename, folders)
    if found is not None:
        return found
    folder = writable_folder(folders)
    if folder is None:
        raise DownloadError(f"none of {', '.join(map(str, folders))} can be written to")
    print(f"[weights] {filename}: not in {', '.join(map(str, folders))}; downloading {url} into {folder}")
    return download(url, folder / filename, digest=digest, timeout=timeout, attempts=attempts)


def torch_hub_checkpoints() -> Path:
    """torch's hub cache for weights files (`torch.hub.get_dir()/checkpoints`), where torchvision keeps them."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why `url` cannot be downloaded now, in a few words; None when its server answers for the file. Only the
    first byte is asked for: a check, not a download."""
    import requests

    headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
            return None if r.status_code in (200, 206) else f"HTTP {r.status_code} {r.reason}"
    except (requests.RequestException, OSError) as exc:
        return network_reason(exc, url)[0]


def pretrained_needs(params: Params) -> list[tuple[str, str, tuple[Path, ...], str]]:
    """(what needs it, its PRETRAINED key, the folders its stage looks in, what else can be done) for each
    pretrained file the params use: teacher.source and teacher.ensemble's pretrained teachers (teachers.py
    looks in weights.dir), VGG19 for loss.perceptual (losses.py: weights.dir, then torch's hub cache)."""
    wdir = resolve_weights_dir(params.weights.dir)
    teachers = [("teacher.source", params.teacher.source)]
    teachers += [("teacher.ensemble", name) for name in params.teacher.ensemble]
    needs = [
        (f"{key} {name}", f"{name}_x{params.data.scale}", (wdir,), "")
        for key, name in teachers
        if f"{name}_x{params.data.scale}" in PRETRAINED
    ]
    if params.loss.perceptual > 0:
        needs.append(
            ("loss.perceptual", "vgg19", (wdir, torch_hub_checkpoints()), " or set loss.perceptual=0")
        )
    return needs


def check_pretrained(params: Params, timeout: float = 10.0) -> list[str]:
    """The pretrained files the params need, each found (and matching its pinned sha256) or its server
    answering; else one short line naming the file and what to do. check_params runs it, so a file that
    cannot be had stops the run before DVC deletes any stage's outputs. Returns the file names."""
    if params.teacher.source == "checkpoint" and not Path(params.teacher.checkpoint).is_file():
        raise UserError(f"teacher.checkpoint: {params.teacher.checkpoint!r} is not a file")
    names = []
    for what, key, folders, alt in pretrained_needs(params):
        spec = PRETRAINED[key]  # read now, not at import: tests point it at a local server
        name, pin = spec["filename"], spec["sha256"]
        names.append(name)
        found = find_file(name, folders)
        if found is not None:
            got = file_digest(found) if pin else ""
            if not got.startswith(pin or ""):
                raise UserError(
                    f"{what}: {without_home(str(found))} has sha256 {got[:8]}..., not {pin[:8]}...: delete it "
                    "or put the official file there"
                )
            continue
        reason = unreachable(spec["url"], timeout)
        if reason:  # kept short (under 200 characters as printed): the folder it goes in is what to act on
            wdir = without_home(str(folders[0]))
            raise UserError(
                f"{what} needs {name}: not found, cannot download ({reason}); put it in {wdir}{alt}"
            )
    return names
