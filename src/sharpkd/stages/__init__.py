"""The DVC stages, one module each, named as in dvc.yaml: `python -m sharpkd.stages.<name>`.

Every stage module has `run(params, paths, tracker) -> dict` and ends with
`run_stage("<name>", run)`. `run_stage` loads params.yaml (config.py), opens the stage's
MLflow child run (tracking/) and turns a `UserError` into one clear line and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from sharpkd.config import Params, load_params
from sharpkd.errors import UserError


@dataclass(frozen=True)
class StagePaths:
    """The on-disk contract between stages (docs/architecture.md), relative to the repository root."""

    raw: Path = Path("data/raw")  # download -> degrade
    pairs: Path = Path("data/pairs")  # degrade -> every later stage
    teacher: Path = Path("models/teacher")  # teacher -> cache_teacher, evaluate, export
    teacher_cache: Path = Path("data/teacher")  # cache_teacher -> distill, evaluate
    student: Path = Path("models/student")  # distill -> evaluate, export
    checkpoints: Path = Path("models/checkpoints")  # distill's resume state (persisted by DVC)
    metrics: Path = Path("metrics")
    export: Path = Path("models/export")

    @classmethod
    def under(cls, root: str | Path) -> StagePaths:
        """The same layout under another root (tests, a copy of the pipeline)."""
        return cls(**{f.name: Path(root) / getattr(cls, f.name) for f in fields(cls)})


StageFn = Callable[[Params, StagePaths, object], dict]


def run_stage(name: str, run: StageFn, params_path: str = "params.yaml") -> None:
    """Run one DVC stage: `run(params, StagePaths(), tracker)` inside its MLflow child run.

    A UserError (bad params, a missing file, bad input) exits with status 1 and a
    message naming what is wrong, without a traceback; the run is marked FAILED.
    """
    from sharpkd import tracking

    try:
        params = load_params(params_path)
        with tracking.stage_run(name, params) as tracker:
            run(params, StagePaths(), tracker)
    except UserError as exc:
        print(f"error [{name}]: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)
