"""TorchScript (.pt) and student checkpoint (.pth) models: these need torch, imported here only when such a
file is opened (the ONNX path never imports this module's torch).

TorchScript carries code that runs when it is loaded and run, so a .pt is opened only when it is this
checkout's own export (its sha256 is one that the export stage recorded in models/export/model_card.json
under the root of the git checkout holding the current folder; outside a checkout, none is) or inside
`trusting_code()` (`--trust-code`).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from sharpkd.deploy.checkout import EXPORT_DIR, checkout_root
from sharpkd.deploy.descriptor import ANY_SCALE_GRID, Model, Verification, first_line, model_scale
from sharpkd.errors import UserError

PIPELINE_EXTRA = "pip install 'sharpkd[pipeline]'"
_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("sharpkd_trust_code", default=False)


@contextlib.contextmanager
def trusting_code(allowed: bool = True) -> Iterator[None]:
    """Within the block, `load_model` opens any TorchScript file (`--trust-code`: its code runs), not only
    this checkout's own export."""
    token = _TRUST_CODE.set(allowed)
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def export_card() -> Path | None:
    """models/export/model_card.json of the current checkout (what the export stage wrote and hashed), found
    from its root; None outside a checkout (a card in any folder, beside a downloaded .pt, vouches for
    nothing)."""
    root = checkout_root()
    return root / EXPORT_DIR / "model_card.json" if root is not None else None


def export_digests(card: Path | None = None) -> set[str]:
    """The sha256 of every file the export stage wrote, as its model card records them (none without one)."""
    card = card or export_card()
    if card is None:
        return set()
    try:
        files = json.loads(card.read_text()).get("files", {})
        return {
            f["sha256"] for f in files.values() if isinstance(f, dict) and isinstance(f.get("sha256"), str)
        }
    except (OSError, ValueError, AttributeError):
        return set()


def _torch(path: Path):
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: a {path.suffix} model needs the training stack: {PIPELINE_EXTRA}") from None
    return torch


def _check_device(torch, device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")


class TorchFunction:
    """A torch module as a float32 array function: the array goes to `device` and the output comes back."""

    def __init__(self, torch, module, device: str):
        self.torch, self.module, self.device = torch, module, device

    def __call__(self, x):
        with self.torch.no_grad():
            y = self.module(self.torch.from_numpy(x).to(self.device))
        if not isinstance(y, self.torch.Tensor):
            return y  # Model.check_outputs names what it is
        return y.float().cpu().numpy()


def _check_code_allowed(path: Path, data: bytes, sha256: str) -> None:
    """TorchScript runs its own code: refused unless it is this checkout's export or the user trusts it."""
    if _TRUST_CODE.get() or sha256 in export_digests():
        return
    card = export_card()
    why = (
        f"its sha256 is not among the files of {card}"
        if card is not None
        else f"the current folder is in no git checkout, whose {EXPORT_DIR / 'model_card.json'} would list it"
    )
    raise UserError(
        f"{path}: a TorchScript model runs the code it carries, and this one is not this checkout's export "
        f"({why}); use a .onnx or .pth model, or pass --trust-code to run it if you trust whoever made it"
    )


def _load_torchscript(torch, path: Path, device: str, verification: Verification):
    try:
        data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    import hashlib

    _check_code_allowed(path, data, hashlib.sha256(data).hexdigest())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still loads
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch.jit raises RuntimeError subclasses with long C++ traces
        raise UserError(f"{path}: not a TorchScript model ({first_line(exc)})") from None
    module.eval()
    return module, model_scale(path, getattr(module, "scale", None), "attribute 'scale'")


def load_torch_model(path: Path, kind: str, device: str, verification: Verification) -> Model:
    """A .pt (kind torchscript) or .pth (kind checkpoint, a student of this project) as a Model."""
    torch = _torch(path)
    _check_device(torch, device)
    if kind == "checkpoint":
        from sharpkd.models.student import load_student  # the student's architecture: the pipeline's

        module = load_student(path, device)
        scale = module.scale
    else:
        module, scale = _load_torchscript(torch, path, device, verification)
    return Model(
        path, kind, scale, scale or ANY_SCALE_GRID, "float32", "float32", device, (), 0, True, verification,
        TorchFunction(torch, module, device),
    )  # fmt: skip
