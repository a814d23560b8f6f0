"""Metric conventions (Y channel, border crop, uint8) and LPIPS loading without the internet (issue 5)."""

from __future__ import annotations

import math
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SHARED, lpips_from_empty_server, serve_folder
from sharpkd import metrics as M
from sharpkd.metrics import PSNR_CAP, QualityMetrics

torch.set_num_threads(1)

SET5 = SHARED / "testsets" / "Set5"


@pytest.fixture(scope="module")
def m4():
    return QualityMetrics(4, lpips=False)


def _image(h=64, w=48, lo=40, hi=200, seed=0):
    return np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8)


def test_identical_images(m4):
    a = _image()
    s = m4.score(a, a.copy())
    assert s["psnr"] == PSNR_CAP and s["ssim"] == pytest.approx(1.0, abs=1e-6) and s["lpips"] is None


def test_constant_shift_has_the_y_channel_psnr(m4):
    # +d on R, G and B moves BT.601 Y by d * (65.481 + 128.553 + 24.966) / 255 = d * 219/255.
    a = _image()
    for d in (5, 20):  # (at d=1 pyiqa's eps=1e-8 on the MSE shows in the 3rd decimal)
        expected = 20 * math.log10(255 / (d * 219 / 255))
        assert m4.score(a + np.uint8(d), a)["psnr"] == pytest.approx(expected, abs=2e-3)


def test_border_of_scale_pixels_is_ignored(m4):
    ref = _image()
    out = ref.copy()
    out[:4] = 0  # damage only the 4-pixel border rows (scale 4)
    out[:, -4:] = 255
    assert m4.score(out, ref)["psnr"] == PSNR_CAP
    out[4, 10] = 0  # one pixel just inside the border counts
    assert m4.score(out, ref)["psnr"] < PSNR_CAP
    # at scale 2 the same rows 2-3 are inside the scored area
    m2 = QualityMetrics(2, lpips=False)
    ref2 = _image()
    out2 = ref2.copy()
    out2[2:4] = 0
    assert m2.score(out2, ref2)["psnr"] < 30


def test_inputs_must_be_uint8_and_big_enough(m4):
    a = _image()
    with pytest.raises(TypeError, match="uint8"):
        m4.score(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="differ in size"):
        m4.score(a[:-4], a)
    small = _image(18, 40)
    with pytest.raises(ValueError, match=r"40x18 is too small.*at least 19"):
        m4.score(small, small)
    assert M.min_side(4) == 19 and m4.score(_image(19, 19), _image(19, 19))["psnr"] == PSNR_CAP


@pytest.mark.skipif(not (SET5 / "LR_bicubic" / "X4").is_dir(), reason=f"{SET5} with MATLAB LR x4 not present")
def test_set5_bicubic_matches_published_table(m4):
    """MATLAB LR x4 up-scaled with PIL bicubic: 28.43 dB / 0.8101 (published 28.42 / 0.8104)."""
    from PIL import Image

    from sharpkd.deploy.images import list_images, read_rgb

    psnr, ssim = [], []
    for p in list_images(SET5 / "HR"):
        hr = read_rgb(p)[0]
        lr = Image.open(SET5 / "LR_bicubic" / "X4" / f"{p.stem}x4.png").convert("RGB")
        up = np.asarray(lr.resize((hr.shape[1], hr.shape[0]), Image.BICUBIC))
        s = m4.score(up, hr)
        psnr.append(s["psnr"])
        ssim.append(s["ssim"])
    assert len(psnr) == 5
    assert np.mean(psnr) == pytest.approx(28.42, abs=0.05)
    assert np.mean(ssim) == pytest.approx(0.8104, abs=0.002)


# ---------------------------------------------------------------- LPIPS weights


def _fake_lpips_files(folder: Path) -> dict[str, M.WeightFile]:
    """Files with the layout of the real ones and random weights (the real ones are not on this machine).

    The AlexNet classifier is saved as expanded views of one value, so the file stays small.
    """
    from torchvision.models import alexnet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {
        k: (v if k.startswith("features") else torch.zeros(1).expand(v.shape))
        for k, v in alexnet().state_dict().items()
    }
    torch.save(state, folder / "alexnet-test.pth")
    chns = [64, 192, 384, 256, 256]  # AlexNet's five feature widths, one linear layer each
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chns)},
        folder / "LPIPS-test.pth",
    )
    return {
        "alexnet": M.WeightFile(
            "alexnet-test.pth", "http://127.0.0.1:9/alexnet-test.pth", "checkpoints", None
        ),
        "lpips": M.WeightFile("LPIPS-test.pth", "http://127.0.0.1:9/LPIPS-test.pth", "pyiqa", None),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch hub's folder moved to tmp (nothing cached there)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub"


def test_lpips_reason_does_not_record_the_home_path(tmp_path, hub, monkeypatch):
    """The reason goes into eval.json, the model card and MLflow: the account's home is written ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SHARPKD_WEIGHTS_DIR", raising=False)
    with lpips_from_empty_server(tmp_path / "empty_site", monkeypatch):
        m = QualityMetrics(4, lpips=True)  # weights.dir "": ~/.cache/sharpkd/weights
    assert (
        m.lpips_reason
        == "no LPIPS: alexnet-owt-7be5be79.pth not found, download failed: HTTP 404 File not found"
    )
    assert str(tmp_path) not in m.lpips_reason


def test_lpips_null_with_reason_when_weights_missing(tmp_path, hub, monkeypatch):
    # The real URLs, but pointed at a local server that has nothing: no internet is touched.
    with lpips_from_empty_server(tmp_path / "empty_site", monkeypatch):
        m = QualityMetrics(4, lpips=True, weights_dir=tmp_path / "weights")
    assert m.lpips_reason is not None and len(m.lpips_reason) <= 120
    assert "alexnet-owt-7be5be79.pth not found" in m.lpips_reason
    a = _image()
    s = m.score(a, np.roll(a, 1, axis=0))
    assert s["lpips"] is None and s["psnr"] < 40  # the other metrics still work
    assert not any(hub.rglob("*.pth"))  # nothing half-downloaded left behind


def test_lpips_download_times_out_on_a_silent_server(tmp_path, hub, monkeypatch):
    """A server that accepts the connection and never answers: the download gives up after the timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/"
    files = {
        k: M.WeightFile(f.filename, url + f.filename, f.cache_subdir, None)
        for k, f in M._lpips_files().items()
    }
    monkeypatch.setattr(M, "_lpips_files", lambda: files)
    monkeypatch.setattr(M, "DOWNLOAD_TIMEOUT_S", 0.5)
    try:
        m = QualityMetrics(4, lpips=True, weights_dir=tmp_path / "weights")
    finally:
        stop.set()
        for c in conns:
            c.close()
        srv.close()
    assert m.lpips_reason is not None and "timed out" in m.lpips_reason.lower()
    assert socket.getdefaulttimeout() is None  # the global timeout is restored


def test_lpips_uses_cached_files_without_network(tmp_path, hub, monkeypatch):
    files = _fake_lpips_files(tmp_path / "weights")
    monkeypatch.setattr(M, "_lpips_files", lambda: files)
    m = QualityMetrics(4, lpips=True, weights_dir=tmp_path / "weights")
    assert m.lpips_reason is None, m.lpips_reason
    a = _image()
    assert m.score(a, a.copy())["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert m.score(255 - a, a)["lpips"] > 0
    assert torch.hub._hub_dir is None  # the temporary hub folder was handed back


def test_lpips_downloads_into_the_hub_cache(tmp_path, hub, monkeypatch):
    site = tmp_path / "site"
    files = _fake_lpips_files(site)
    with serve_folder(site) as base:
        served = {
            k: M.WeightFile(f.filename, base + f.filename, f.cache_subdir, None) for k, f in files.items()
        }
        monkeypatch.setattr(M, "_lpips_files", lambda: served)
        m = QualityMetrics(4, lpips=True, weights_dir=tmp_path / "weights")
    assert m.lpips_reason is None, m.lpips_reason
    assert (hub / "checkpoints" / "alexnet-test.pth").is_file() and (
        hub / "pyiqa" / "LPIPS-test.pth"
    ).is_file()


def test_lpips_file_without_linear_layers_is_refused(tmp_path, hub, monkeypatch):
    files = _fake_lpips_files(tmp_path / "weights")
    torch.save({"something": torch.zeros(3)}, tmp_path / "weights" / "LPIPS-test.pth")
    monkeypatch.setattr(M, "_lpips_files", lambda: files)
    m = QualityMetrics(4, lpips=True, weights_dir=tmp_path / "weights")
    assert m.lpips_reason is not None and "LPIPS-test.pth" in m.lpips_reason and "lin" in m.lpips_reason


def test_lpips_reason_is_short_and_whole(tmp_path, hub, monkeypatch):
    """The issue's reason: a 330-character exception text cut mid-word, copied to eval.json, the model card
    and MLflow. Now its first line, whole words, under 120 characters."""
    long = "LPIPS weights could not be built because " + "the network layer configuration " * 9
    assert len(long) > 300

    def broken(folder):
        raise RuntimeError(long.strip() + "\nTraceback details on a second line")

    monkeypatch.setattr(M, "load_lpips", broken)
    reason = QualityMetrics(4, lpips=True, weights_dir=tmp_path).lpips_reason
    assert len(reason) <= 120 and "\n" not in reason and "Traceback" not in reason
    assert reason.startswith("no LPIPS: LPIPS weights could not be built because the network")
    assert (
        reason.endswith(" configuration...") or reason.endswith(" network...") or reason.endswith(" layer...")
    )


def test_brief_cuts_at_a_word_boundary():
    from sharpkd.errors import brief

    assert brief("  short\n second line") == "short"
    text = "word " * 40
    cut = brief(text, 50)
    assert len(cut) <= 50 and cut.endswith("word...") and "wor..." not in cut
    assert brief("\n\n  ok  then ") == "ok then"


def test_lpips_not_requested():
    m = QualityMetrics(2, lpips=False)
    assert "not requested" in m.lpips_reason
