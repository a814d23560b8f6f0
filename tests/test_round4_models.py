"""Hardening, round 4, of the models `sharpkd sharpen` and the served student open (sharpkd.deploy: models,
descriptor, sessions, torch_models, serving): a model card dropped outside a checkout, ONNX metadata and
I/O that do not fit (a scale of 0 or 100000, 0-255 pixels on one side only, a fixed input size), and
requests to the served model (`mlflow models serve`) that are too large, broken or mistyped. Each case gives
one line naming the model (or the image by its index) and what is wrong. Real files: ONNX built with
onnx.helper, TorchScript scripted here, PNGs written byte by byte where they lie; the served model through
MLflow's own scoring function in this process (what the server runs per request), no server started."""

from __future__ import annotations

import base64
import io
import json
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from sharpkd.cli import app
from sharpkd.deploy import serving
from sharpkd.deploy.checkout import checkout_root
from sharpkd.deploy.models import SCALE_KEY, load_model
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest

runner = CliRunner()


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _sharpen(*args) -> object:
    return runner.invoke(app, ["sharpen", *map(str, args)], env={"COLUMNS": "200"})


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(path: Path, h: int = 20, w: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(h, w)).save(path)
    return path


def _png_bytes(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_noise(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def _zero_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An RGB PNG of zeros, compressed row by row (never held decoded); `rows`: only that many rows of
    pixel data follow the header (a file whose header alone says how large it is)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then the row's pixels
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _onnx(
    path: Path,
    nodes: list | None = None,
    inp: int = TensorProto.FLOAT,
    out: int = TensorProto.FLOAT,
    shape: tuple = (1, 3, "h", "w"),
    meta: dict[str, str] | None = None,
    inits: list | None = None,
) -> Path:
    """An ONNX model from `nodes` (default: Identity) reading `input` and writing `output`."""
    x = helper.make_tensor_value_info("input", inp, list(shape))
    y = helper.make_tensor_value_info("output", out, [1, 3, None, None])
    nodes = nodes or [helper.make_node("Identity", ["input"], ["output"])]
    model = helper.make_model(
        helper.make_graph(nodes, "m", [x], [y], initializer=inits or []),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8  # what this ONNX Runtime reads
    if meta:
        helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------ row 3: a model card outside a checkout


class Passes(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def _card(folder: Path, model: Path) -> Path:
    card = folder / "models" / "export" / "model_card.json"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(json.dumps({"files": {model.name: {"sha256": file_digest(model)}}}))
    return card


def test_row03_a_model_card_outside_a_checkout_vouches_for_no_torchscript(tmp_path, monkeypatch):
    """A folder (no git checkout) holding evil.pt and a models/export/model_card.json listing its sha256:
    from there, `sharpkd sharpen img.png --model evil.pt` is refused (its code would run). In a checkout,
    the card at the checkout's root counts, from any folder in it; one in the current folder does not."""
    folder = tmp_path / "download"
    folder.mkdir()
    evil = folder / "evil.pt"
    torch.jit.save(torch.jit.script(Passes()), str(evil))
    _card(folder, evil)
    _png(folder / "img.png")
    monkeypatch.chdir(folder)
    assert checkout_root() is None, "the test's folder must not be inside a git checkout"
    res = _sharpen(folder / "img.png", "--model", "evil.pt")
    assert res.exit_code == 1 and not (folder / "img_sharp.png").exists(), res.output
    assert _one_line(res.stderr) == (
        "error: evil.pt: a TorchScript model runs the code it carries, and this one is not this checkout's "
        "export (the current folder is in no git checkout, whose models/export/model_card.json would list it); "
        "use a .onnx or .pth model, or pass --trust-code to run it if you trust whoever made it"
    )

    # A checkout: its root's card is read, not the current folder's.
    (folder / ".git").mkdir()
    (folder / "models" / "export" / "model_card.json").unlink()
    sub = folder / "sub"
    _card(sub, evil)
    monkeypatch.chdir(sub)
    res = _sharpen(folder / "img.png", "--model", evil)
    assert res.exit_code == 1 and not (folder / "img_sharp.png").exists(), res.output
    assert f"not among the files of {folder / 'models/export/model_card.json'}" in _one_line(res.stderr)
    _card(folder, evil)
    res = _sharpen(folder / "img.png", "--model", evil)
    assert res.exit_code == 0 and (folder / "img_sharp.png").is_file(), res.output


# ------------------------------------------------------------------ rows 10, 11, 18: models that do not fit


@pytest.mark.parametrize("scale", ["0", "abc", "100000", "-2", "2.5", ""])
def test_row10_a_scale_in_the_onnx_metadata_outside_1_to_8_is_one_line_naming_the_model(tmp_path, scale):
    """export.py writes `sharpkd.scale`; another value (0 divided by zero, 100000 had the load check
    allocate 240 GB) is refused before the model runs."""
    model = _onnx(tmp_path / "m.onnx", meta={SCALE_KEY: scale})
    res = _sharpen(_png(tmp_path / "img.png"), "--model", model)
    assert res.exit_code == 1 and not (tmp_path / "img_sharp.png").exists(), res.output
    assert _one_line(res.stderr) == (
        f"error: {model}: its metadata 'sharpkd.scale' = {scale!r} is not a scale (a whole number from 1 to 8, "
        "as `dvc repro export` writes it)"
    )
    good = _onnx(tmp_path / "good.onnx", meta={SCALE_KEY: "2"})
    assert load_model(good).scale == 2


@pytest.mark.parametrize(
    ("inp", "out", "spans"),
    [(TensorProto.UINT8, TensorProto.FLOAT, "0 to 255"), (TensorProto.FLOAT, TensorProto.UINT8, "0 to 0")],
)
def test_row11_a_model_with_0_255_pixels_on_one_side_only_is_refused(tmp_path, inp, out, spans):
    """uint8 in and float 0-255 out (every image came out white), or float in and uint8 out (black): the
    load check's output is out of the 0-1 range. uint8 both ways (the INT8 export) is taken."""
    model = _onnx(tmp_path / "m.onnx", [helper.make_node("Cast", ["input"], ["output"], to=out)], inp, out)
    res = _sharpen(_png(tmp_path / "img.png"), "--model", model)
    assert res.exit_code == 1 and not (tmp_path / "img_sharp.png").exists(), res.output
    types = {TensorProto.UINT8: "uint8", TensorProto.FLOAT: "float32"}
    assert _one_line(res.stderr) == (
        f"error: {model}: not a sharpening model: its output on a 36x48 test image of 0-1 pixels spans {spans}, "
        f"not 0-1 (it takes {types[inp]} and gives {types[out]}: 0-255 values on one side only?); "
        "nothing was written"
    )

    # A hard sharpening filter (5 x centre - 4 neighbours) spans -4 to 5 on the test image's noise: taken.
    kernel = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32)
    weights = numpy_helper.from_array(np.repeat(kernel[None, None], 3, axis=0), "w")
    conv = helper.make_node("Conv", ["input", "w"], ["output"], group=3, pads=[1, 1, 1, 1])
    hard = _onnx(tmp_path / "hard.onnx", [conv], inits=[weights])
    assert _sharpen(tmp_path / "img.png", "--model", hard, "-o", tmp_path / "hard.png").exit_code == 0

    int8 = _onnx(tmp_path / "int8.onnx", inp=TensorProto.UINT8, out=TensorProto.UINT8)
    res = _sharpen(tmp_path / "img.png", "--model", int8)
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "img_sharp.png")), _noise(20, 24))
    loaded = load_model(int8)
    frame = _noise(16, 16).transpose(2, 0, 1)[None].copy()
    assert loaded.takes_bytes and np.array_equal(loaded.run_bytes(frame), frame)


@pytest.mark.parametrize(("shape", "shown"), [((1, 3, 64, 64), "1x3x64x64"), ((1, 3, "h", 64), "1x3x?x64")])
def test_row18_an_onnx_of_a_fixed_size_is_refused_at_load(tmp_path, shape, shown):
    """It passed the load check (run at its own size), then ONNX Runtime failed on every image: refused
    when loaded, in one line (tiling it at its size would leave any smaller image out)."""
    model = _onnx(tmp_path / "fixed.onnx", shape=shape)
    want = (
        f"{model}: its input is fixed at {shown}, but images (and their tiles) come in any size; export it "
        "with a free height and width (dynamic axes), as `dvc repro export` does"
    )
    with pytest.raises(UserError) as err:
        load_model(model)
    assert str(err.value) == want
    res = _sharpen(_png(tmp_path / "img.png", 64, 64), "--model", model)
    assert res.exit_code == 1 and _one_line(res.stderr) == f"error: {want}"


# ------------------------------------------------------------------ rows 4, 14, 25: the served model


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The MLflow model folder of an identity ONNX model, as the export stage logs it (tile 64, overlap 8)."""
    folder = tmp_path_factory.mktemp("served")
    serving.save_model(str(folder / "model"), onnx_path=_onnx(folder / "student.onnx"), tiling=(64, 8))
    return folder / "model"


def _load(served: Path):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(served))


def _invoke(model, body: dict) -> tuple[int, str]:
    """(HTTP status, reply text) of a JSON request, as `mlflow models serve` answers it."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        res = scoring_server.invocations(
            json.dumps(body), "application/json", model, model.metadata.get_input_schema()
        )
    except MlflowException as exc:  # what the server's handler turns into the reply
        return exc.get_http_status_code(), exc.serialize_as_json()
    return res.status, res.response


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _message(reply: str) -> str:
    body = json.loads(reply)
    assert "stack_trace" not in body and "Traceback" not in reply and "site-packages" not in reply, reply[
        :2000
    ]
    return body["message"]


def test_row04_a_served_image_over_the_pixel_bound_is_refused_from_its_header(served, monkeypatch):
    """SHARPKD_SERVE_MAX_PIXELS (default 40 MP, ~2 GB at peak) bounds a served image, read from its header
    before decoding: a 9000x9000 PNG of zeros (81 MP) took 30 s and 4.1 GB."""
    env = "SHARPKD_SERVE_MAX_PIXELS"  # read when the model is loaded (the server starts)
    monkeypatch.setenv(env, "1000")
    model = _load(served)
    status, reply = _invoke(
        model, {"inputs": {"image": [_b64(_png_bytes(30, 30)), _b64(_png_bytes(40, 40))]}}
    )
    assert status == 400 and _message(reply) == (
        "image 1: 40x40 is 1600 pixels, over this server's limit of 1000 pixels (SHARPKD_SERVE_MAX_PIXELS); "
        "send a smaller image"
    )
    monkeypatch.setenv(env, "lots")
    with pytest.raises(UserError, match=r"^SHARPKD_SERVE_MAX_PIXELS='lots': not a number of pixels"):
        serving.max_pixels()

    monkeypatch.delenv(env)
    model = _load(served)
    bomb = _zero_png(9000, 9000)
    assert len(bomb) < 300_000
    for data in (bomb, _zero_png(9000, 9000, rows=1)):  # the header alone: nothing is decoded
        started = time.monotonic()
        status, reply = _invoke(model, {"inputs": {"image": [_b64(data)]}})
        assert status == 400 and _message(reply) == (
            "image 0: 9000x9000 is 81000000 pixels, over this server's limit of 40000000 pixels "
            "(SHARPKD_SERVE_MAX_PIXELS); send a smaller image"
        )
        assert time.monotonic() - started < 10


def test_row14_a_served_bomb_or_truncated_png_is_a_400_naming_its_index_and_no_internals(served):
    """A PNG whose header declares 400 MP (PIL's own bound refuses it at open: that was the server's
    traceback in the reply) and a PNG cut short (that was the server's temp path)."""
    model = _load(served)
    good = _b64(_png_bytes(20, 20))
    status, reply = _invoke(model, {"inputs": {"image": [good, _b64(_zero_png(20000, 20000, rows=1))]}})
    assert status == 400 and _message(reply) == (
        "image 1: its header declares over this server's limit of 40000000 pixels (SHARPKD_SERVE_MAX_PIXELS); "
        "send a smaller image"
    )
    cut = _png_bytes(64, 64)
    status, reply = _invoke(model, {"inputs": {"image": [good, good, _b64(cut[: len(cut) // 2])]}})
    message = _message(reply)
    assert status == 400 and message.startswith("image 2: cannot decode image ("), message
    assert "sharpkd-serve" not in reply and tempfile.gettempdir() not in reply, reply


def test_row25_served_params_follow_the_cli_rules_and_errors_never_echo_the_request(served):
    """`"params": {"tile": 0}` silently meant the default tile; a request with another key than `image`
    (a 1.4 MB image) was answered with 3.8 MB echoing it."""
    model = _load(served)
    good = _b64(_png_bytes(20, 20))
    for params, want in (
        ({"tile": 0}, "params: tile must be at least 16, got 0"),
        (
            {"tile": 32, "overlap": 32},
            "params: overlap must be at least 0 and smaller than the tile (32), got 32",
        ),
    ):
        status, reply = _invoke(model, {"inputs": {"image": [good]}, "params": params})
        assert status == 400 and _message(reply) == want
    status, _ = _invoke(model, {"inputs": {"image": [good]}, "params": {"tile": 16, "overlap": 0}})
    assert status == 200

    big = _png_bytes(700, 700)
    assert len(big) > 1_400_000
    for body in (
        {"inputs": {"img": [_b64(big)]}},
        {"instances": [{"img": _b64(big)}]},
        {"dataframe_split": {"columns": ["img"], "data": [[_b64(big)]]}},
        {"dataframe_records": [{"img": _b64(big)}]},
    ):
        status, reply = _invoke(model, body)
        assert status == 400 and len(reply) < 500, (list(body), len(reply))
        assert _message(reply) == (
            'the request holds no \'image\' input; send {"inputs": {"image": [<base64 of an image>, ...]}}'
        )
    # An error of this model's own (a broken image) is not prefixed with the request either.
    status, reply = _invoke(model, {"inputs": {"image": [_b64(big[: len(big) // 2])]}})
    assert status == 400 and len(reply) < 500 and _message(reply).startswith("image 0: cannot decode image")
