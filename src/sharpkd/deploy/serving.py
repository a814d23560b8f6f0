"""The registered student as an MLflow model that `mlflow models serve` serves: image bytes in, PNG out.

This module is the model's MLflow flavor (tracking/runs.py logs it with `Model.log(flavor=serving)`)
and its pyfunc loader (`loader_module: sharpkd.deploy.serving` in the MLmodel file):

- the model folder holds the export's float32 ONNX file (`data/student.onnx`), listed under two
  flavors: `python_function` (this loader) and `onnx` (so `mlflow.onnx.load_model` also opens it);
- input: a DataFrame whose column `image` holds encoded images (PNG, JPEG, WebP, TIFF, BMP; alpha and
  16 bits kept); the signature types it `binary`, so over HTTP each value is base64 text, which the
  scoring server decodes (a str value given to `predict` directly is base64-decoded here as well);
- output: a DataFrame with the column `image`, each value the sharpened image as PNG bytes (base64
  text in the server's JSON reply), the size of its input;
- params `tile` / `overlap` (defaults: the export's `infer.tile` / `infer.overlap`, else tiling.DEFAULT_TILE),
  checked as `sharpkd sharpen` checks --tile / --overlap (tiling.check_tiling);
- an image over SHARPKD_SERVE_MAX_PIXELS pixels (default MAX_PIXELS) is refused from its header, before
  anything is decoded.

A bad request is an HTTP 400 whose message names the image by its index (`image 2: ...`), in one line:
never the server's temp files, its traceback, nor the request echoed back (`request_error`).

Every image goes through `sharpen.sharpen_image`, the function `sharpkd sharpen` runs, on the ONNX
file opened by `models.load_model`: the server's reply is the file `sharpkd sharpen` writes.
The loader imports sharpkd (its light install and MLflow: `pip install 'sharpkd[serve]'`), so serve from
that environment: `--env-manager local`.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from sharpkd.deploy.pixels import batch_to_image
from sharpkd.deploy.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling
from sharpkd.errors import UserError

COLUMN = "image"
# PIL format -> the suffix the input is written under (load_image reads TIFFs' 16 bits by suffix).
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp", "PPM": ".ppm"}
_REQUIREMENTS = ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", "av")
# The largest image served, in pixels (the environment variable overrides it). Decoded and tiled, an image
# takes ~45 bytes a pixel: a 9000x9000 PNG of zeros is 105 KB on the wire and 4 GB in the server. 40 MP
# (8K UHD is 33) peaks near 2 GB.
MAX_PIXELS_ENV, MAX_PIXELS = "SHARPKD_SERVE_MAX_PIXELS", 40_000_000
_LOG = logging.getLogger(__name__)


def png_bytes(example: Any) -> bytes:
    """PNG bytes of an input example: encoded bytes as they are, or an image array ((1,)3,H,W float
    in [0,1] as the export stage passes, or HxWx3 uint8)."""
    from PIL import Image

    if isinstance(example, bytes):
        return example
    arr = np.asarray(example)
    if arr.dtype != np.uint8:
        arr = batch_to_image(arr.reshape(arr.shape[-3:]))
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def signature(tile: int, overlap: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    # `image` is not required of the request: MLflow answers a missing column by echoing the whole request
    # back (MBs of base64); here `_values` says what is missing in one line.
    return ModelSignature(
        inputs=Schema([ColSpec("binary", COLUMN, required=False)]),
        outputs=Schema([ColSpec("binary", COLUMN)]),
        params=ParamSchema([ParamSpec("tile", "integer", tile), ParamSpec("overlap", "integer", overlap)]),
    )


def requirements() -> list[str]:
    """What the model needs besides sharpkd, pinned to this environment (local builds unpinned)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]


def save_model(
    path: str,
    mlflow_model=None,
    onnx_path: str | Path = "",
    example: Any = None,
    tiling: tuple[int, int] | None = None,
    **_: Any,
) -> None:
    """The MLflow model folder at `path` (called by mlflow's Model.log with the flavor = this module)."""
    import mlflow.pyfunc
    import onnx
    import pandas as pd
    from mlflow.models import Model

    tile, overlap = tiling or (DEFAULT_TILE, DEFAULT_OVERLAP)
    mlflow_model = mlflow_model or Model()
    example = example if example is not None else np.full((16, 16, 3), 128, np.uint8)
    with warnings.catch_warnings():
        # mlflow's own example check compares the columns with a range (pandas 3 deprecates that).
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        mlflow.pyfunc.save_model(
            path,
            loader_module=__name__,
            data_path=str(onnx_path),
            mlflow_model=mlflow_model,
            signature=signature(tile, overlap),
            input_example=pd.DataFrame({COLUMN: [png_bytes(example)]}),
            pip_requirements=requirements(),
        )
    mlflow_model.add_flavor(
        "onnx",
        onnx_version=onnx.__version__,
        data=f"data/{Path(onnx_path).name}",
        providers=["CPUExecutionProvider"],
    )
    mlflow_model.save(str(Path(path) / "MLmodel"))


def _load_pyfunc(data_path: str) -> SharpenModel:
    return SharpenModel(Path(data_path))


def _as_bytes(value: Any) -> bytes:
    """One input value: encoded image bytes, or base64 text of them (as str or bytes: the scoring
    server decodes the base64 of `dataframe_split` / `dataframe_records`, not that of `inputs`)."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise UserError(f"expected encoded image bytes (or base64 text), got {type(value).__name__}")
    raw = bytes(value)
    try:  # an encoded image always holds bytes outside the base64 alphabet (PNG, JPEG, BMP headers)
        return base64.b64decode(b"".join(raw.split()), validate=True)
    except ValueError:
        return raw


def _values(model_input: Any) -> list:
    """The images of a predict call: the `image` column (or the only one) of a DataFrame, a list,
    a dict of one column, or a single value."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame | dict):
        columns = list(model_input.keys())  # MLflow drops those its signature does not name
        if COLUMN not in columns and len(columns) != 1:
            raise UserError(
                f"the request holds no '{COLUMN}' input; send "
                f'{{"inputs": {{"{COLUMN}": [<base64 of an image>, ...]}}}}'
            )
        return list(model_input[COLUMN if COLUMN in columns else columns[0]])
    if isinstance(model_input, bytes | str):
        return [model_input]
    return list(model_input)


def max_pixels() -> int:
    """The largest image served, in pixels: $SHARPKD_SERVE_MAX_PIXELS, else MAX_PIXELS."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return MAX_PIXELS
    if text.isdecimal() and int(text) > 0:
        return int(text)
    raise UserError(f"{MAX_PIXELS_ENV}={text[:40]!r}: not a number of pixels (a whole number above 0)")


def _tiling(params: dict[str, Any]) -> tuple[int, int]:
    """The params' tile and overlap, by the rules of `sharpkd sharpen`'s --tile / --overlap."""
    values = []
    for name in ("tile", "overlap"):
        value = params.get(name)
        try:
            values.append(None if value is None else int(value))
        except (TypeError, ValueError):
            raise UserError(f"params: {name} must be a whole number, got {str(value)[:40]!r}") from None
    try:
        return check_tiling(*values)
    except UserError as exc:  # its message names the CLI's options
        raise UserError(f"params: {str(exc).replace('--', '')}") from None


@functools.cache
def request_error() -> type:
    """The MlflowException of a bad request (HTTP 400; another error_code for others) whose message stays as
    given: the scoring server rewrites the message of one raised by `predict` to begin with the request
    itself (`Failed to predict data '<every byte sent>'`), megabytes of base64 for an image."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class RequestError(MlflowException):
        def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE):
            super().__init__(message, error_code)

        @property
        def message(self) -> str:
            return self._message

        @message.setter
        def message(self, value: str) -> None:
            if not hasattr(self, "_message"):  # set once, by __init__
                self._message = value

    return RequestError


class SharpenModel:
    """The pyfunc implementation: each image through `sharpkd sharpen`'s own image path."""

    def __init__(self, onnx_path: Path):
        from sharpkd.deploy.models import load_model

        self.model = load_model(onnx_path, "cpu")
        self.max_pixels = max_pixels()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

        error = request_error()
        try:
            tile, overlap = _tiling(params or {})
            values = _values(model_input)
        except UserError as exc:  # a bad request (HTTP 400), never a server error
            raise error(str(exc)) from None
        out = []
        for i, value in enumerate(values):
            try:
                out.append(self.sharpen(_as_bytes(value), tile, overlap))
            except UserError as exc:
                raise error(f"{COLUMN} {i}: {exc}") from None
            except Exception:  # this server's fault: its traceback goes to its log, not to the client
                _LOG.exception("%s %d of a request failed", COLUMN, i)
                raise error(
                    f"{COLUMN} {i}: the server failed on it (its log says why)", INTERNAL_ERROR
                ) from None
        return pd.DataFrame({COLUMN: out})

    def sharpen(self, data: bytes, tile: int, overlap: int) -> bytes:
        """Encoded image -> the PNG `sharpkd sharpen` writes for it; refused from its header when it holds
        over `max_pixels` pixels."""
        from PIL import Image, UnidentifiedImageError

        from sharpkd.deploy.jobs import Job
        from sharpkd.deploy.sharpen import sharpen_image

        too_large = (
            f"over this server's limit of {self.max_pixels} pixels ({MAX_PIXELS_ENV}); send a smaller image"
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below is ours
                with Image.open(io.BytesIO(data)) as im:  # reads the header: nothing is decoded yet
                    suffix = _SUFFIXES.get(im.format or "", ".png")
                    width, height = im.size
        except Image.DecompressionBombError:  # PIL's own bound (2 x Image.MAX_IMAGE_PIXELS), at open
            raise UserError(f"its header declares {too_large}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise UserError(
                f"not an image PIL can read ({len(data)} bytes; send PNG, JPEG, WebP, TIFF or BMP bytes)"
            ) from None
        if width * height > self.max_pixels:
            raise UserError(f"{width}x{height} is {width * height} pixels, {too_large}")
        with tempfile.TemporaryDirectory(prefix="sharpkd-serve-") as tmp:
            src, dst = Path(tmp) / f"input{suffix}", Path(tmp) / "sharp.png"
            src.write_bytes(data)
            try:
                sharpen_image(self.model, Job(src, dst, None, overwrite=True), tile, overlap)
            except UserError as exc:  # it names the temp file: the client knows its image by its index
                raise UserError(str(exc).replace(f"{src}: ", "").replace(tmp, "<temp>")) from None
            return dst.read_bytes()
