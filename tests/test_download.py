"""The download stage (issue 2, points 5 and 7): div2k over a local HTTP server, folder, samples, bad input.

No test touches the internet: DIV2K-shaped zips are served from 127.0.0.1, by a
small server below that honours HTTP Range and can cut a response midway.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import (
    REPO,
    SHARED,
    TINY,
    deep_update,
    repo_params_dict,
    run_download,
    serve_folder,
    tiny_params,
)
from sharpkd.data import sources
from sharpkd.data.sources import SAMPLE_PHOTOS
from sharpkd.deploy.images import load_image, read_rgb
from sharpkd.errors import UserError
from sharpkd.fetch import DownloadError, download

MANIFEST_COLUMNS = ["split", "source", "name", "origin", "width", "height", "sha256", "note"]


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A small RGB image with gradients and texture (so that codecs and resizes have work to do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _check_raw(out: Path) -> pd.DataFrame:
    """What every data/raw must be: a manifest whose rows match 8-bit RGB PNGs byte for byte."""
    df = pd.read_csv(out / "manifest.csv", dtype={"name": str}, keep_default_na=False)
    assert list(df.columns) == MANIFEST_COLUMNS
    for row in df.itertuples():
        path = out / row.split / f"{row.name}.png"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (row.width, row.height))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(f"{r.split}/{r.name}.png" for r in df.itertuples())
    assert not [
        p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
    ]  # no temporary leftovers
    # Ordinary modes (umask), not the 0600/0700 of the temporary files they were written as.
    umask = os.umask(0)
    os.umask(umask)
    modes = (out.stat().st_mode & 0o777, (out / "manifest.csv").stat().st_mode & 0o777)
    assert modes == (0o777 & ~umask, 0o666 & ~umask)
    return df


# --------------------------------------------------------------------------- a server that resumes and cuts


class RangeServer:
    """Serves `files` (name -> bytes) on 127.0.0.1 with HTTP Range support.

    The first `cuts` responses send only `cut_after` bytes of their body and then drop the
    connection. `requests` logs (name, Range header); `sent` counts body bytes per file.
    """

    def __init__(self, files: dict[str, bytes], cut_after: int | None = None, cuts: int = 0):
        self.files, self.cut_after, self.cuts = files, cut_after, cuts
        self.requests: list[tuple[str, str | None]] = []
        self.sent: dict[str, int] = {}

    def __enter__(self) -> str:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                header = self.headers.get("Range")
                srv.requests.append((name, header))
                data = srv.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if header:
                    start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if srv.cut_after is not None and srv.cuts > 0:
                    srv.cuts -= 1
                    body = body[: srv.cut_after]
                    self.wfile.write(body)
                    self.wfile.flush()
                    srv.sent[name] = srv.sent.get(name, 0) + len(body)
                    self.connection.shutdown(socket.SHUT_RDWR)  # a dropped connection, mid-body
                    self.close_connection = True
                    return
                self.wfile.write(body)
                srv.sent[name] = srv.sent.get(name, 0) + len(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- DIV2K-shaped zips


def _zip(folder: str, images: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    # Stored, not deflated: a flipped byte then lands in the PNG data, a CRC error the reader must catch.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{folder}/", b"")
        for name in sorted(images, reverse=True):  # not in name order: the code must sort
            zf.writestr(f"{folder}/{name}.png", _png(images[name]))
    return buf.getvalue()


@pytest.fixture(scope="module")
def div2k():
    """name -> (zip bytes, {image name: pixels}), laid out like the official zips."""
    train = {f"{i:04d}": _photo(40, 48, i) for i in (1, 2, 3)}
    valid = {f"{i:04d}": _photo(36, 44, i) for i in (801, 802)}
    return {
        "DIV2K_train_HR.zip": (_zip("DIV2K_train_HR", train), train),
        "DIV2K_valid_HR.zip": (_zip("DIV2K_valid_HR", valid), valid),
    }


def _expect(monkeypatch, zips: dict[str, bytes], **change):
    """Point sources.DIV2K_ZIPS at the test zips (their real sizes and md5s unless changed)."""
    table = {}
    for split, filename in (("train", "DIV2K_train_HR.zip"), ("valid", "DIV2K_valid_HR.zip")):
        data = zips[filename]
        size, md5 = change.get(split, (len(data), hashlib.md5(data).hexdigest()))
        table[split] = (filename, size, md5)
    monkeypatch.setattr(sources, "DIV2K_ZIPS", table)


def _div2k_params(base_url: str, cache: Path, train_count: int = 2, valid_count: int = 1):
    d2k = {
        "base_url": base_url,
        "train_count": train_count,
        "valid_count": valid_count,
        "cache_dir": str(cache),
    }
    return tiny_params(data={"source": "div2k", "div2k": d2k})


def test_div2k_tables_match_design():
    """The md5s and sizes in sources.py are those the DIV2K site lists (train: size and md5; valid: md5 only)."""
    assert sources.DIV2K_ZIPS["train"] == (
        "DIV2K_train_HR.zip",
        3_530_603_713,
        "bdc2d9338d4e574fe81bf7d158758658",
    )
    assert sources.DIV2K_ZIPS["valid"][0] == "DIV2K_valid_HR.zip"
    assert sources.DIV2K_ZIPS["valid"][2] == "9fcdda83005c5e5997799b69f955ff88"
    assert repo_params_dict()["data"]["div2k"]["base_url"] == "http://data.vision.ee.ethz.ch/cvl/DIV2K/"


def test_div2k_download_first_n_and_cache(tmp_path, monkeypatch, div2k, capsys):
    zips = {k: v[0] for k, v in div2k.items()}
    _expect(monkeypatch, zips)
    cache, out = tmp_path / "cache", tmp_path / "raw"
    server = RangeServer(zips)
    with server as url:
        counts = run_download(_div2k_params(url, cache), out)
    assert counts["train"] == 2 and counts["valid"] == 1 and counts["skipped"] == []
    assert [r for _, r in server.requests] == [None, None]  # one plain GET per zip
    df = _check_raw(out)
    # The first N images by name, names kept as strings ("0001", not 1).
    assert df[df.split == "train"].name.tolist() == ["0001", "0002"]
    assert df[df.split == "valid"].name.tolist() == ["0801"]
    assert set(df.source) == {"div2k"}
    assert df.origin.tolist()[0] == "DIV2K_train_HR.zip:DIV2K_train_HR/0001.png"
    for row in df.itertuples():
        np.testing.assert_array_equal(
            read_rgb(out / row.split / f"{row.name}.png")[0],
            div2k["DIV2K_train_HR.zip" if row.split == "train" else "DIV2K_valid_HR.zip"][1][row.name],
        )
    assert sorted(p.name for p in cache.iterdir()) == [
        "DIV2K_train_HR.zip",
        "DIV2K_valid_HR.zip",
    ]  # no .part left
    assert (cache / "DIV2K_train_HR.zip").read_bytes() == zips["DIV2K_train_HR.zip"]

    # Verified zips in the cache are not fetched again: this run has no server at all.
    capsys.readouterr()
    counts = run_download(_div2k_params(url, cache, train_count=3, valid_count=2), out)
    assert counts["train"] == 3 and counts["valid"] == 2
    assert "not fetched again" in capsys.readouterr().out
    assert len(server.requests) == 2


def test_div2k_count_larger_than_zip(tmp_path, monkeypatch, div2k, capsys):
    zips = {k: v[0] for k, v in div2k.items()}
    _expect(monkeypatch, zips)
    with RangeServer(zips) as url:
        counts = run_download(_div2k_params(url, tmp_path / "c", 800, 100), tmp_path / "raw")
    assert counts["train"] == 3 and counts["valid"] == 2
    assert (
        "data.div2k.train_count = 800, but DIV2K_train_HR.zip holds 3 PNG images" in capsys.readouterr().out
    )


def test_div2k_resume_after_cut_connection(tmp_path, monkeypatch, div2k, capsys):
    zips = {k: v[0] for k, v in div2k.items()}
    _expect(monkeypatch, zips)
    train = zips["DIV2K_train_HR.zip"]
    cut = len(train) // 3
    server = RangeServer(zips, cut_after=cut, cuts=1)  # the first response (the train zip) is cut
    with server as url:
        counts = run_download(_div2k_params(url, tmp_path / "cache"), tmp_path / "raw")
    assert counts["train"] == 2
    train_requests = [r for name, r in server.requests if name == "DIV2K_train_HR.zip"]
    assert train_requests == [None, f"bytes={cut}-"]  # resumed where the cut left it
    assert server.sent["DIV2K_train_HR.zip"] == len(train)  # no byte fetched twice
    assert (tmp_path / "cache" / "DIV2K_train_HR.zip").read_bytes() == train
    assert "interrupted at" in capsys.readouterr().out
    _check_raw(tmp_path / "raw")


def test_interrupted_download_keeps_part_then_resumes_next_run(tmp_path):
    data = bytes(range(256)) * 40
    md5 = hashlib.md5(data).hexdigest()
    dest = tmp_path / "cache" / "big.zip"
    part = dest.with_name("big.zip.part")
    server = RangeServer({"big.zip": data}, cut_after=1000, cuts=10)  # every response dies after 1000 bytes
    with server as url, pytest.raises(DownloadError) as err:
        download(url + "big.zip", dest, len(data), ("md5", md5), attempts=2)
    assert (
        "failed after 2 attempts" in str(err.value)
        and str(part) in str(err.value)
        and "resume" in str(err.value)
    )
    assert not dest.exists() and part.stat().st_size == 2000
    assert part.read_bytes() == data[:2000]

    server = RangeServer({"big.zip": data})  # the next run, the network is back
    with server as url:
        assert download(url + "big.zip", dest, len(data), ("md5", md5)) == dest
    assert server.requests == [("big.zip", "bytes=2000-")]
    assert server.sent["big.zip"] == len(data) - 2000
    assert dest.read_bytes() == data and not part.exists()


def test_part_file_already_complete(tmp_path):
    """A .part holding the whole file (killed between download and rename): 416, then verified and used."""
    data = os.urandom(3000)
    dest = tmp_path / "f.zip"
    dest.with_name("f.zip.part").write_bytes(data)
    server = RangeServer({"f.zip": data})
    with server as url:
        download(url + "f.zip", dest, len(data), ("md5", hashlib.md5(data).hexdigest()))
    assert server.requests == [("f.zip", "bytes=3000-")] and server.sent == {}
    assert dest.read_bytes() == data


def test_server_without_range_support_restarts(tmp_path, capsys):
    """A plain static server answers 200 to a Range request: the download starts over, correctly."""
    data = os.urandom(5000)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "f.zip").write_bytes(data)
    dest = tmp_path / "cache" / "f.zip"
    dest.parent.mkdir()
    dest.with_name("f.zip.part").write_bytes(data[:1234])
    with serve_folder(tmp_path / "srv") as url:
        download(url + "f.zip", dest, len(data), ("md5", hashlib.md5(data).hexdigest()))
    assert dest.read_bytes() == data
    assert "does not support resuming" in capsys.readouterr().out


def test_md5_mismatch_removes_the_file(tmp_path, monkeypatch, div2k):
    zips = {k: v[0] for k, v in div2k.items()}
    _expect(monkeypatch, zips, train=(len(zips["DIV2K_train_HR.zip"]), "0" * 32))
    out = tmp_path / "raw"
    (out / "train").mkdir(parents=True)
    (out / "manifest.csv").write_text("old\n")  # an earlier complete output
    with RangeServer(zips) as url, pytest.raises(DownloadError) as err:
        run_download(_div2k_params(url, tmp_path / "cache"), out)
    msg = str(err.value)
    assert "DIV2K_train_HR.zip" in msg and "md5 mismatch" in msg and "0" * 32 in msg and "removed" in msg
    assert list((tmp_path / "cache").iterdir()) == []  # neither the zip nor a .part
    assert (out / "manifest.csv").read_text() == "old\n"  # the old output is untouched


def test_size_mismatch_removes_the_file(tmp_path, monkeypatch, div2k):
    zips = {k: v[0] for k, v in div2k.items()}
    size = len(zips["DIV2K_train_HR.zip"])
    _expect(monkeypatch, zips, train=(size + 100, hashlib.md5(zips["DIV2K_train_HR.zip"]).hexdigest()))
    with (
        RangeServer(zips) as url,
        pytest.raises(DownloadError, match=rf"expected {size + 100} bytes, got {size}"),
    ):
        run_download(_div2k_params(url, tmp_path / "cache"), tmp_path / "raw")
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "raw").exists()


def test_truncated_zip(tmp_path, monkeypatch, div2k):
    """A zip cut short (its md5 matching, as a broken mirror would serve it): stopped, removed, nothing written."""
    zips = {k: v[0] for k, v in div2k.items()}
    zips["DIV2K_valid_HR.zip"] = zips["DIV2K_valid_HR.zip"][: len(zips["DIV2K_valid_HR.zip"]) // 2]
    _expect(monkeypatch, zips, valid=(None, hashlib.md5(zips["DIV2K_valid_HR.zip"]).hexdigest()))
    with RangeServer(zips) as url, pytest.raises(DownloadError) as err:
        run_download(_div2k_params(url, tmp_path / "cache"), tmp_path / "raw")
    assert "DIV2K_valid_HR.zip" in str(err.value) and "not a valid zip" in str(err.value)
    assert not (tmp_path / "cache" / "DIV2K_valid_HR.zip").exists()
    assert (tmp_path / "cache" / "DIV2K_train_HR.zip").exists()  # the good one stays cached
    assert not (tmp_path / "raw").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw.")]


def test_corrupt_member_stops_without_output(tmp_path, monkeypatch, div2k):
    zips = {k: v[0] for k, v in div2k.items()}
    bad = bytearray(zips["DIV2K_train_HR.zip"])
    at = bytes(bad).index(b"IDAT") + 20  # inside the first stored PNG's pixel data
    bad[at] ^= 0xFF
    zips["DIV2K_train_HR.zip"] = bytes(bad)
    _expect(monkeypatch, zips)
    with (
        RangeServer(zips) as url,
        pytest.raises(DownloadError, match=r"member DIV2K_train_HR/000\d.png is corrupt"),
    ):
        run_download(_div2k_params(url, tmp_path / "cache", 3, 2), tmp_path / "raw")
    assert not (tmp_path / "cache" / "DIV2K_train_HR.zip").exists() and not (tmp_path / "raw").exists()


def test_corrupt_cached_zip_is_fetched_again(tmp_path, monkeypatch, div2k, capsys):
    zips = {k: v[0] for k, v in div2k.items()}
    _expect(monkeypatch, zips)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "DIV2K_train_HR.zip").write_bytes(b"not the zip")
    server = RangeServer(zips)
    with server as url:
        run_download(_div2k_params(url, cache), tmp_path / "raw")
    assert "does not match the expected size/digest; removed" in capsys.readouterr().out
    assert server.requests == [("DIV2K_train_HR.zip", None), ("DIV2K_valid_HR.zip", None)]
    assert (cache / "DIV2K_train_HR.zip").read_bytes() == zips["DIV2K_train_HR.zip"]


def test_http_error_names_the_url(tmp_path, monkeypatch, div2k):
    zips = {k: v[0] for k, v in div2k.items()}
    _expect(monkeypatch, zips)
    with RangeServer({}) as url, pytest.raises(DownloadError, match=r"/DIV2K_train_HR.zip: HTTP 404"):
        run_download(_div2k_params(url, tmp_path / "cache"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------- what a failed download says

NOISE = ("MaxRetryError", "HTTPConnectionPool", "object at 0x", "urllib3", "Errno")


def _one_short_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 200 and not [n for n in NOISE if n in msg], msg
    return msg


def test_dns_failure_is_one_short_line_with_no_retry(tmp_path, monkeypatch, capsys):
    """An offline machine: the name does not resolve (getaddrinfo fails as it does then; nothing leaves the
    machine). Retrying cannot help: one attempt, no "trying again", the reason in a few words."""
    lookups = []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "weights.example.test":
            lookups.append(host)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(DownloadError) as err:
        download("https://weights.example.test/models/w.pth", tmp_path / "w.pth", attempts=5)
    msg = _one_short_line(err.value)
    assert msg == "https://weights.example.test/models/w.pth: DNS failure for weights.example.test"
    assert err.value.reason == "DNS failure for weights.example.test"
    assert lookups == ["weights.example.test"]  # tried once
    out = capsys.readouterr().out
    assert "trying again" not in out and "interrupted" not in out
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_one_short_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(DownloadError) as err:
        download(f"http://127.0.0.1:{port}/w.pth", tmp_path / "w.pth", attempts=3)
    assert _one_short_line(err.value).endswith(f": connection refused by 127.0.0.1:{port}")
    assert "trying again" not in capsys.readouterr().out


def test_a_silent_server_times_out_and_is_tried_again(tmp_path, capsys):
    """A server that accepts and never answers: a timeout may pass, so it is tried again, saying so once."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    where = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        with pytest.raises(DownloadError) as err:
            download(f"http://{where}/w.pth", tmp_path / "w.pth", timeout=0.3, attempts=2)
    finally:
        srv.close()
    msg = _one_short_line(err.value)
    assert msg == f"http://{where}/w.pth: download failed after 2 attempts ({where} timed out)"
    assert capsys.readouterr().out.splitlines() == [f"[download] w.pth: {where} timed out; trying again"]


def test_wrong_sha256_says_so_in_its_reason(tmp_path):
    server = RangeServer({"w.pth": b"not the weights"})
    with server as url, pytest.raises(DownloadError) as err:
        download(url + "w.pth", tmp_path / "w.pth", digest=("sha256", "0" * 64))
    assert err.value.reason == "sha256 mismatch" and "removed" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- samples


@pytest.fixture(scope="module")
def samples_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "raw"
    counts = run_download(tiny_params(), out)
    return out, counts


def test_samples_source(samples_raw):
    import skimage.data

    out, counts = samples_raw
    assert counts["train"] == len(SAMPLE_PHOTOS) - 2 and counts["valid"] == 2 and counts["skipped"] == []
    df = _check_raw(out)
    assert set(df.name) == set(SAMPLE_PHOTOS) and set(df.source) == {"samples"}
    assert {"astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle"} <= set(SAMPLE_PHOTOS)
    np.testing.assert_array_equal(
        read_rgb(out / df.split[df.name == "coffee"].item() / "coffee.png")[0], skimage.data.coffee()
    )


def test_samples_split_is_deterministic(samples_raw, tmp_path):
    out, _ = samples_raw
    first = pd.read_csv(out / "manifest.csv")
    run_download(tiny_params(), tmp_path / "again")
    again = pd.read_csv(tmp_path / "again" / "manifest.csv")
    pd.testing.assert_frame_equal(first, again)  # same seed: same split, same bytes (sha256)
    # The seed decides the split (it is not a fixed list).
    splits = {tuple(sorted(sources._samples(tiny_params(seed=s))["valid"])) for s in range(6)}
    assert len(splits) > 1


def test_samples_valid_count_too_large(tmp_path):
    with pytest.raises(UserError, match="data.samples.valid_count"):
        run_download(tiny_params(data={"samples": {"valid_count": len(SAMPLE_PHOTOS)}}), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------- folder


def _write_jpeg_with_orientation(path: Path, img: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(path, format="JPEG", quality=95, exif=exif)


@pytest.fixture
def user_folders(tmp_path):
    """A user's folder tree: common formats, nested, plus every kind of awkward file."""
    train, valid = tmp_path / "mine" / "train", tmp_path / "mine" / "valid"
    (train / "sub" / "deeper").mkdir(parents=True)
    valid.mkdir(parents=True)
    img = {k: _photo(30, 40, k) for k in range(10)}
    Image.fromarray(img[0]).save(train / "plain.png")
    Image.fromarray(img[1]).save(train / "sub" / "photo.JPG", quality=95)
    Image.fromarray(img[2]).save(train / "sub" / "deeper" / "scan.tif")
    Image.fromarray(img[3]).save(train / "web.webp", lossless=True)
    Image.fromarray(img[4]).save(train / "old.bmp")
    Image.fromarray(img[5][..., 0]).save(train / "gray.png")
    Image.fromarray(np.dstack([img[6], np.full((30, 40), 200, np.uint8)])).save(train / "rgba.png")
    deep16 = (img[7].astype(np.uint16) * 257 + 100).astype(np.uint16)
    cv2.imwrite(str(train / "deep16.png"), deep16[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(train / "gray16.png"), deep16[..., 0])
    _write_jpeg_with_orientation(train / "rotated.jpg", img[8], 6)
    (train / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (train / "truncated.png").write_bytes(_png(img[9])[:200])
    (train / "notes.txt").write_text("not an image, not listed")
    Image.fromarray(_photo(32, 32, 50)).save(valid / "v1.png")
    return train, valid, img, deep16


def test_folder_source_formats_and_bad_files(user_folders, tmp_path, capsys):
    train, valid, img, deep16 = user_folders
    params = tiny_params(data={"source": "folder", "folder": {"train": str(train), "valid": str(valid)}})
    out = tmp_path / "raw"
    counts = run_download(params, out)
    printed = capsys.readouterr().out
    df = _check_raw(out).set_index("name")
    assert counts["train"] == 10 and counts["valid"] == 1
    # Corrupt and truncated files: skipped, counted, named.
    assert len(counts["skipped"]) == 2
    for bad in ("corrupt.png", "truncated.png"):
        assert any(bad in s for s in counts["skipped"])
        assert re.search(rf"skipped .*{bad}: cannot decode image", printed)
    assert "notes" not in df.index
    assert {"sub__photo", "sub__deeper__scan", "web", "old", "plain"} <= set(df.index)  # recursed
    px = {n: read_rgb(out / "train" / f"{n}.png")[0] for n in df.index if df.split[n] == "train"}
    np.testing.assert_array_equal(px["plain"], img[0])
    np.testing.assert_array_equal(px["sub__deeper__scan"], img[2])  # TIFF
    np.testing.assert_array_equal(px["web"], img[3])
    np.testing.assert_array_equal(px["old"], img[4])
    # Converted, and the manifest and the log say so, naming the file.
    np.testing.assert_array_equal(px["gray"], np.repeat(img[5][..., :1], 3, axis=2))
    assert "grayscale expanded to RGB" in df.note["gray"]
    np.testing.assert_array_equal(px["rgba"], img[6])
    assert "alpha" in df.note["rgba"]
    expected8 = ((deep16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(px["deep16"], expected8)
    assert "16-bit scaled to 8-bit" in df.note["deep16"]
    np.testing.assert_array_equal(px["gray16"], np.repeat(expected8[..., :1], 3, axis=2))
    assert f"{train / 'deep16.png'}: converted (16-bit scaled to 8-bit)" in printed
    # EXIF orientation 6 (rotate 90 clockwise to display).
    assert px["rotated"].shape == (40, 30, 3) and "EXIF orientation 6" in df.note["rotated"]
    with Image.open(train / "rotated.jpg") as im:  # the stored pixels, as decoded before any turning
        stored = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(px["rotated"], np.rot90(stored, -1))


def test_folder_without_valid_holds_out_every_tenth(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(_photo(16, 16, i)).save(folder / f"{i:02d}.png")
    params = tiny_params(data={"source": "folder", "folder": {"train": str(folder), "valid": ""}})
    run_download(params, tmp_path / "raw")
    df = _check_raw(tmp_path / "raw")
    assert df[df.split == "valid"].name.tolist() == ["00", "10"]
    assert len(df[df.split == "train"]) == 10


def test_folder_same_name_in_two_places(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(_photo(16, 16, 0)).save(folder / "x.png")
    Image.fromarray(_photo(16, 16, 1)).save(folder / "x.jpg")
    Image.fromarray(_photo(16, 16, 2)).save(folder / "a" / "x.png")
    Image.fromarray(_photo(16, 16, 3)).save(folder / "v.png")
    valid = tmp_path / "valid"  # apart: a valid folder inside the training one is refused (leakage)
    valid.mkdir()
    Image.fromarray(_photo(16, 16, 4)).save(valid / "w.png")
    params = tiny_params(data={"source": "folder", "folder": {"train": str(folder), "valid": str(valid)}})
    run_download(params, tmp_path / "raw")
    df = _check_raw(tmp_path / "raw")
    assert sorted(df[df.split == "train"].name) == ["a__x", "v", "x", "x_2"]  # nothing overwritten


@pytest.mark.parametrize("case", ["empty", "missing", "only_bad", "empty_valid"])
def test_folder_bad_input(tmp_path, case):
    train, valid = tmp_path / "train", tmp_path / "valid"
    train.mkdir()
    valid.mkdir()
    Image.fromarray(_photo(16, 16, 0)).save(valid / "v.png")
    if case == "only_bad":
        (train / "a.png").write_bytes(b"garbage")
        (train / "b.jpg").write_bytes(b"")
    elif case == "empty_valid":
        Image.fromarray(_photo(16, 16, 0)).save(train / "t.png")
        (valid / "v.png").unlink()
    elif case == "missing":
        train = tmp_path / "nowhere"
    if case == "empty":
        (train / "readme.txt").write_text("no images here")
    out = tmp_path / "raw"
    (out / "train").mkdir(parents=True)
    (out / "manifest.csv").write_text("old\n")
    params = tiny_params(data={"source": "folder", "folder": {"train": str(train), "valid": str(valid)}})
    with pytest.raises(UserError) as err:
        run_download(params, out)
    msg = str(err.value)
    expected = {
        "empty": (f"'data.folder.train' = {train}", "no images found"),
        "missing": (f"'data.folder.train' = {train}", "folder not found"),
        "only_bad": ("no usable train image", "skipped 2 unreadable"),
        "empty_valid": (f"'data.folder.valid' = {valid}", "no images found"),
    }[case]
    assert all(e in msg for e in expected), msg
    assert (out / "manifest.csv").read_text() == "old\n"  # the earlier output stands, nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw.")]


def test_mcmaster_tiff():
    folder = SHARED / "trainsets" / "McMaster"
    files = sorted(folder.glob("*.tif"))
    if not files:
        pytest.skip(f"{folder} not present (the McMaster TIFFs of ../shared/trainsets)")
    rgb, note = read_rgb(files[0])
    with Image.open(files[0]) as im:
        ref = np.asarray(im.convert("RGB"))
    assert rgb.dtype == np.uint8 and rgb.shape == ref.shape and rgb.shape[2] == 3
    np.testing.assert_array_equal(rgb, ref)
    assert note == ""


def test_16bit_tiff_keeps_precision_and_orientation(tmp_path):
    tifffile = pytest.importorskip(
        "tifffile", reason="tifffile writes the 16-bit TIFF with an Orientation tag"
    )
    a = (np.random.default_rng(0).random((12, 20, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "o.tif", a, photometric="rgb", extratags=[(274, "H", 1, 8, True)])
    loaded = load_image(tmp_path / "o.tif", keep_16bit=True)
    assert loaded.rgb.dtype == np.uint16 and "EXIF orientation 8" in loaded.note
    np.testing.assert_array_equal(loaded.rgb, np.rot90(a, 1))  # 8: rotate 90 counter-clockwise
    rgb8, note = read_rgb(tmp_path / "o.tif")
    assert rgb8.shape == (20, 12, 3) and "16-bit scaled to 8-bit" in note


# --------------------------------------------------------------------------- the stages as DVC runs them


def _repo_copy(dst: Path) -> Path:
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the tracked files to copy")
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def test_stage_scripts_in_a_repo_copy(tmp_path):
    """`python stages/download.py` and `stages/degrade.py` as dvc.yaml runs them; a bad key is one line, exit 1."""
    repo = _repo_copy(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(repo_params_dict(), TINY)))
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}

    def run(stage):
        return subprocess.run(
            [sys.executable, str(REPO / "stages" / f"{stage}.py")],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    for stage in ("download", "degrade"):
        proc = run(stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    _check_raw(repo / "data" / "raw")
    assert '"min_side": 32' in (repo / "data" / "pairs" / "pairs.json").read_text()
    assert np.load(repo / "data" / "pairs" / "train_hr.npy", mmap_mode="r").ndim == 1  # whole images, flat

    bad = deep_update(repo_params_dict(), TINY)
    bad["data"]["patch_sise"] = 48
    (repo / "params.yaml").write_text(yaml.safe_dump(bad))
    proc = run("download")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown key 'data.patch_sise'" in proc.stderr and "patch_size" in proc.stderr
    _check_raw(repo / "data" / "raw")  # the earlier output is intact


def test_folder_source_with_a_file_name_that_is_not_utf8(tmp_path):
    """A 16-bit PNG named with a byte that is not UTF-8 (OpenCV segfaulted on such names, leaving the
    temporary folder behind): the stage, run as DVC runs it (a subprocess, so a crash fails only this
    test), reads it and records the name escaped."""
    photos = tmp_path / "photos"
    photos.mkdir()
    ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 65536, (40, 48, 3), dtype=np.uint16))
    (photos / os.fsdecode(b"bad\xff.png")).write_bytes(buf.tobytes())
    for i in (1, 2):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(photos / f"good{i}.png")
    params = deep_update(repo_params_dict(), TINY)
    params["data"].update(source="folder", folder={"train": str(photos), "valid": ""})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "download.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
    manifest = pd.read_csv(tmp_path / "data/raw/manifest.csv")
    row = manifest[manifest["name"] == "bad\\xff"].iloc[0]
    assert row["origin"] == f"{photos}/bad\\xff.png" and "16-bit scaled to 8-bit" in row["note"]
    assert (tmp_path / "data/raw" / row["split"] / "bad\\xff.png").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]  # no temporary folder left
