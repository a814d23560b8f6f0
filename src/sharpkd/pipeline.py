"""What every DVC stage shares: the on-disk layout between stages and the way a stage is run.

Each stage is a thin script, stages/<name>.py at the top of the repository, named as in dvc.yaml;
it has `run(params, paths, tracker) -> dict` and ends with `run_stage("<name>", run)`.
`run_stage` loads params.yaml (config.py), opens the stage's MLflow child run (tracking/) and
turns a `UserError` into one clear line and exit status 1.
`check_params` runs first in dvc.yaml and depends on params.yaml as a whole, so any edit of it
(even of a key no stage lists) is validated by `dvc repro`.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from sharpkd.config import Params, load_params
from sharpkd.errors import UserError
from sharpkd.files import remove_stale_temps
from sharpkd.tracking.runs import Tracker


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


StageFn = Callable[[Params, StagePaths, Tracker], dict]


def remove_killed_leftovers(dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Remove the temporaries that killed stages left beside or in any output of dvc.yaml.

    Every stage looks, not only the one that was killed: DVC may restore that one's outputs from
    its run cache without running it. A temporary of a live process is kept (files.remove_stale_temps).
    """
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return
    folders: set[Path] = set()
    for spec in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in spec.get(key) or []:
                out = Path(next(iter(entry)) if isinstance(entry, dict) else entry)
                folders |= {out.parent, out}
    for folder in sorted(folders):
        remove_stale_temps(folder)


def run_stage(name: str, run: StageFn, params_path: str = "params.yaml", track: bool = True) -> None:
    """Run one DVC stage: `run(params, StagePaths(), tracker)` inside its MLflow child run.

    A UserError (bad params, a missing file, bad input) exits with status 1 and a
    message naming what is wrong, without a traceback; the run is marked FAILED.
    SIGINT and SIGTERM stop the stage through its cleanups (temporary outputs removed,
    the run marked KILLED) with status 130 / 143. `track=False`: no MLflow run.
    """
    from sharpkd import tracking

    # File names that are not UTF-8 reach messages as lone surrogates: print them escaped, never crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    stopped_by: list[int] = []

    def stop(signum, frame):
        stopped_by.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        remove_killed_leftovers()
        params = load_params(params_path)
        if not track:
            run(params, StagePaths(), tracking.NullTracker())
        else:
            with tracking.stage_run(name, params) as tracker:
                run(params, StagePaths(), tracker)
                # A library callback (SQLAlchemy's, once) may swallow the KeyboardInterrupt: the
                # signal still stops the stage, which must not report success.
                if stopped_by:
                    raise KeyboardInterrupt(signal.Signals(stopped_by[0]).name)
        if stopped_by:  # the same, where no run was open
            raise KeyboardInterrupt(signal.Signals(stopped_by[0]).name)
    except UserError as exc:
        print(f"error [{name}]: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        why = "terminated" if signum == signal.SIGTERM else "interrupted"
        print(f"[{name}] {why}; the stage did not finish (`dvc repro` runs it again)", file=sys.stderr)
        sys.exit(128 + signum)
