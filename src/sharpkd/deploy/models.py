"""What `--model` means, and the model it opens: one typed descriptor (`Model`) that sharpen, video,
serving and bench take.

- `resolve_model` is the one place a model spec becomes a file: a path as it is, a zoo student
  (`zoo:NAME`, sharpkd.deploy.zoo), a registered student (`models:/<name>/<version>`, needs MLflow), or,
  given nothing, this checkout's export, else the zoo's default student.
- `load_model` opens a .onnx with ONNX Runtime (sharpkd.deploy.sessions); a TorchScript .pt or a student
  .pth needs torch (sharpkd.deploy.torch_models, imported only then). Every model is run once on a small
  test image before any output is written: its output must be the input's size and finite.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from sharpkd.deploy import zoo
from sharpkd.deploy.checkout import DEFAULT_MODELS, checkout_root
from sharpkd.deploy.descriptor import ANY_SCALE_GRID, Model, Verification, model_scale
from sharpkd.deploy.sessions import OnnxFunction, ort_session, providers_for
from sharpkd.errors import UserError

# Written into the ONNX metadata by export.py, so a session knows its grid.
SCALE_KEY = "sharpkd.scale"
MODEL_KINDS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "checkpoint"}
# The pipeline's registry client, reached by name only for a `models:/` URI (never at import time).
REGISTRY = "sharpkd.tracking.registry"


def resolve_model(spec: str | Path | None) -> tuple[Path, str]:
    """(file, where it came from) for what `--model` names: a path as it is; a zoo student, `zoo:NAME`
    (its INT8 ONNX, checked against the zoo card's sha256); a registered student, `models:/<name>/<version>`,
    `models:/<name>/latest` or `models:/<name>@<alias>`, fetched from the project's MLflow store into a local
    cache (needs MLflow); nothing: the exported student of the current checkout
    (models/export/student_int8.onnx, else student.onnx, found from the checkout's root), else the zoo's
    default student."""
    if spec is not None and str(spec) != "":
        if zoo.is_zoo(str(spec)):
            found = zoo.zoo_file(str(spec))
            return found.path, f"{found.spec}, the zoo's INT8 student"
        if not str(spec).startswith("models:/"):
            return Path(spec), "given"
        try:
            import mlflow  # noqa: F401  (the registry needs it; say so in one line when it is missing)
        except ImportError:
            raise UserError(
                f"{spec}: a registered model needs MLflow: pip install 'sharpkd[serve]'"
            ) from None
        registry = importlib.import_module(REGISTRY)
        return registry.fetch_model(str(spec)), f"{spec} (MLflow registry)"
    root = checkout_root()
    for rel in DEFAULT_MODELS:
        if root is not None and (root / rel).is_file():
            return root / rel, "this checkout's export"
    found = zoo.zoo_file(zoo.PREFIX + zoo.DEFAULT)
    where = f"the checkout at {root}" if root is not None else "here"
    return found.path, f"{found.spec}, the zoo's default (no exported student in {where}; --model to choose)"


def model_kind(path: str | Path) -> tuple[Path, str]:
    """(path, kind) of a model file to open: kind is onnx, torchscript or checkpoint (by its suffix);
    a clear error when the file is missing or of another type."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: model not found; check the path (models/export/ is written by `dvc repro export`), "
            "or pass --model PATH to a .onnx, .pt or .pth file (or a registered student, models:/<name>/<version>)"
        )
    kind = MODEL_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path}: unknown model type '{path.suffix.lower()}' (use .onnx, .pt TorchScript or a .pth student checkpoint)"
        )
    return path, kind


def load_onnx(path: Path, device: str, verification: Verification, threads: int = 0) -> Model:
    """An ONNX file as a Model: its scale from the metadata export.py writes, its pixel types from its I/O.
    One whose input height or width is fixed is refused: images of other sizes, and tiles, would fail."""
    session = ort_session(path, device, threads)  # checks the CUDA provider itself
    fn = OnnxFunction(session)
    if len(fn.input_shape) == 4 and any(isinstance(d, int) for d in fn.input_shape[-2:]):
        shape = "x".join(str(d) if isinstance(d, int) else "?" for d in fn.input_shape)
        raise UserError(
            f"{path}: its input is fixed at {shape}, but images (and their tiles) come in any size; export "
            "it with a free height and width (dynamic axes), as `dvc repro export` does"
        )
    meta = session.get_modelmeta().custom_metadata_map
    scale = model_scale(path, meta.get(SCALE_KEY), f"metadata '{SCALE_KEY}'")
    return Model(
        path, "onnx", scale, scale or ANY_SCALE_GRID, fn.input_type, fn.output_type, device,
        providers_for(device), threads, True, verification, fn,
    )  # fmt: skip


def load_model(spec: str | Path | None = None, device: str = "cpu", threads: int = 0) -> Model:
    """Open what `spec` names (`resolve_model`) on `device`, checked on a test image (Model.check_outputs).
    A .pt or .pth needs torch (sharpkd.deploy.torch_models); a .pt that is not this checkout's export is
    opened only inside `torch_models.trusting_code()`."""
    path, source = resolve_model(spec)
    path, kind = model_kind(path)
    verification = Verification(zoo.sha256(path), source)
    if kind == "onnx":
        model = load_onnx(path, device, verification, threads)
    else:
        from sharpkd.deploy.torch_models import load_torch_model

        model = load_torch_model(path, kind, device, verification)
    model.check_outputs()
    return model
