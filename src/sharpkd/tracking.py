"""MLflow wiring: the one place that talks to MLflow.

(Placeholder interface; the full implementation lands with the tracking issue.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharpkd.config import Params


class StageTracker:
    """What a stage may record. Methods are no-ops when tracking is disabled."""

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None: ...

    def log_onnx_model(self, onnx_path: str | Path, input_example: Any) -> None: ...


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[StageTracker]:
    yield StageTracker()
