"""`sharpkd adapt`: a zoo student fine-tuned to a user's own clips or images, as one DVC experiment.

The teacher labels frames sampled from the clips (and the images) as teacher-only inputs
(data.teacher_only.folder), the student starts from the zoo's weights (student.init) and trains on
them mixed with the labelled photographs params.yaml names, at the fine-tuning recipe of
profiles/adapt.yaml's `set` (its arms are the measured runs, docs/zoo.md); evaluate, export and the
MLflow registration follow as in any `dvc repro`. The experiment runs in the workspace
(`dvc exp run -n NAME`), so its export is models/export/ afterwards, what `sharpkd sharpen` uses.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sharpkd.config import ConfigError, params_from_dict
from sharpkd.deploy import zoo
from sharpkd.errors import UserError
from sharpkd.files import write_json
from sharpkd.profiles import Arm, apply_overrides, load_profile, set_flags

RECIPE = Path("profiles/adapt.yaml")
# Where the inputs named one by one are linked from (data/, models/ and metrics/ are the stages' outputs).
LINKS = Path(".adapt")
RECORD = Path("metrics/adapt.json")  # the last adapt run's wall time (not a DVC output: git-ignored)


@dataclass(frozen=True)
class AdaptPlan:
    name: str
    folder: Path  # data.teacher_only.folder
    overrides: dict[str, object]

    @property
    def command(self) -> list[str]:
        return ["dvc", "exp", "run", "-n", self.name, *set_flags(Arm(self.name, self.name, self.overrides))]


def _arch_overrides(start: str) -> dict[str, object]:
    """The student.* keys of the student `start` names, so that params.student is its size."""
    if zoo.is_zoo(start):
        arch = zoo.card(zoo.name_of(start)).get("arch", {})
    else:
        from sharpkd.models.student import load_student

        arch = load_student(start).arch_kwargs()
    keys = ("channels", "blocks", "activation")
    return {f"student.{k}": arch[k] for k in keys if k in arch}


def parse_sets(sets: list[str]) -> dict[str, object]:
    """`KEY=VALUE` pairs (as `dvc exp run -S` takes them), the value read as YAML."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.steps=1000")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _input_folder(inputs: list[Path], name: str) -> Path:
    """The teacher-only folder: the one folder given, or a folder of links to the files given."""
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise UserError(f"adapt: {', '.join(missing)}: no such file or folder")
    if len(inputs) == 1 and inputs[0].is_dir():
        return inputs[0].resolve()
    if any(p.is_dir() for p in inputs):
        raise UserError("adapt: give one folder, or any number of clips and images, not both")
    folder = (LINKS / name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(inputs):
        link = folder / f"{i:04d}-{path.name}"
        if not link.exists():
            link.symlink_to(path.resolve())
    return folder


def plan(inputs: list[Path], start: str, name: str | None = None, sets: list[str] | None = None) -> AdaptPlan:
    """What `sharpkd adapt` will run: validated against params.yaml before anything runs."""
    if not RECIPE.is_file():
        raise UserError(f"adapt: {RECIPE} not found (run from the repository root)")
    if not zoo.is_zoo(start) and not start.endswith(".pth"):
        raise UserError(
            f"adapt: --from {start!r}: give zoo:NAME ({', '.join(zoo.names())}) or a student .pth"
        )
    stem = re.sub(r"[^a-z0-9]+", "-", inputs[0].resolve().name.lower()).strip("-") or "footage"
    name = name or f"adapt-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = _input_folder(inputs, name)
    overrides = {
        **load_profile(RECIPE).common,
        **_arch_overrides(start),
        "student.init": start,
        "data.teacher_only.folder": str(folder),
        **parse_sets(sets or []),
    }
    base = yaml.safe_load(Path("params.yaml").read_text())
    try:
        params_from_dict(apply_overrides(base, overrides))
    except ConfigError as exc:
        raise UserError(f"adapt: {exc}") from None
    return AdaptPlan(name, folder, overrides)


def run(adapt: AdaptPlan, echo=print) -> int:
    """Run the experiment; on success, record its wall time (metrics/adapt.json, beside the stages'
    metrics) and say how to sharpen with the result."""
    echo(shlex.join(adapt.command))
    t0 = time.perf_counter()
    returncode = subprocess.run(adapt.command).returncode
    if returncode:
        echo(f"adapt: the experiment {adapt.name} failed (exit {returncode}); see the stage output above")
        return returncode
    record = {
        "experiment": adapt.name,
        "from": adapt.overrides["student.init"],
        "folder": str(adapt.folder),
        "minutes": round((time.perf_counter() - t0) / 60, 2),
        "command": shlex.join(adapt.command),
    }
    write_json(RECORD, record)
    echo(f"adapt: {adapt.name} done in {record['minutes']:.1f} min")
    echo("its student is models/export/, registered in MLflow (`sharpkd ui`)")
    echo(f"sharpen with it: sharpkd sharpen {adapt.folder} --model models/export/student_int8.onnx")
    return 0
