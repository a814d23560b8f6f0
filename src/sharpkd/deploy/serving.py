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
- params `tile` / `overlap` (defaults: the export's `infer.tile` / `infer.overlap`, else tiling.DEFAULT_TILE).

Every image goes through `sharpen.sharpen_image`, the function `sharpkd sharpen` runs, on the ONNX
file opened by `models.load_model`: the server's reply is the file `sharpkd sharpen` writes.
The loader imports sharpkd (its light install and MLflow: `pip install 'sharpkd[serve]'`), so serve from
that environment: `--env-manager local`.
"""

from __future__ import annotations

import base64
import io
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

    return ModelSignature(
        inputs=Schema([ColSpec("binary", COLUMN)]),
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

    if isinstance(model_input, pd.DataFrame):
        column = COLUMN if COLUMN in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict):
        return list(model_input.get(COLUMN, next(iter(model_input.values()))))
    if isinstance(model_input, bytes | str):
        return [model_input]
    return list(model_input)


class SharpenModel:
    """The pyfunc implementation: each image through `sharpkd sharpen`'s own image path."""

    def __init__(self, onnx_path: Path):
        from sharpkd.deploy.models import load_model

        self.model = load_model(onnx_path, "cpu")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        params = params or {}
        tile, overlap = int(params.get("tile") or DEFAULT_TILE), int(params.get("overlap", DEFAULT_OVERLAP))
        out = []
        for i, value in enumerate(_values(model_input)):
            try:
                out.append(self.sharpen(_as_bytes(value), tile, overlap))
            except UserError as exc:  # a bad request (HTTP 400), never a server error
                raise MlflowException(f"{COLUMN} {i}: {exc}", INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame({COLUMN: out})

    def sharpen(self, data: bytes, tile: int, overlap: int) -> bytes:
        """Encoded image -> the PNG `sharpkd sharpen` writes for it."""
        from PIL import Image, UnidentifiedImageError

        from sharpkd.deploy.jobs import Job
        from sharpkd.deploy.sharpen import sharpen_image

        check_tiling(tile, overlap)
        try:
            with Image.open(io.BytesIO(data)) as im:
                suffix = _SUFFIXES.get(im.format or "", ".png")
        except (UnidentifiedImageError, OSError, ValueError):
            raise UserError(
                f"not an image PIL can read ({len(data)} bytes; send PNG, JPEG, WebP, TIFF or BMP bytes)"
            ) from None
        with tempfile.TemporaryDirectory(prefix="sharpkd-serve-") as tmp:
            src, dst = Path(tmp) / f"input{suffix}", Path(tmp) / "sharp.png"
            src.write_bytes(data)
            sharpen_image(self.model, Job(src, dst, None, overwrite=True), tile, overlap)
            return dst.read_bytes()
