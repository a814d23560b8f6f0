"""The layout the design card fixes: one thin script per DVC stage in stages/, logic in src/sharpkd."""

from __future__ import annotations

import yaml

from helpers import REPO

MAX_STAGE_LINES = 120


def test_one_thin_script_per_dvc_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    scripts = {p.stem for p in (REPO / "stages").glob("*.py")}
    assert scripts == set(stages), "stages/ holds exactly one script per dvc.yaml stage"
    long = {
        p.name: n
        for p in (REPO / "stages").glob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES
    }
    assert not long, f"stage scripts over {MAX_STAGE_LINES} lines (move the logic into src/sharpkd): {long}"


def test_no_stage_module_inside_the_library():
    assert not (REPO / "src" / "sharpkd" / "stages").exists()


def test_no_library_module_shares_a_name_with_a_stage_script():
    """stages/distill.py runs a stage, the library's modules are named for what they hold
    (distillation.py, onnx_export.py, models/teacher_loader.py): no name means two files."""
    stages = {p.name for p in (REPO / "stages").glob("*.py") if p.name != "__init__.py"}
    library = {p.name for p in (REPO / "src").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(stages & library) == []
