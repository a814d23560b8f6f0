"""Where a checkout of this project keeps its exported students (what `--model` defaults to)."""

from __future__ import annotations

from pathlib import Path

EXPORT_DIR = Path("models/export")
# The exported students a checkout holds, in the order models.resolve_model prefers them.
DEFAULT_MODELS = (EXPORT_DIR / "student_int8.onnx", EXPORT_DIR / "student.onnx")


def checkout_root(start: Path | None = None) -> Path | None:
    """The root of the git checkout holding `start` (default: the current folder), else None."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return folder
    return None
