"""dvc.yaml against the code: `dvc repro` must rerun a stage whenever something it uses changes.

- deps: every sharpkd module a stage's module imports, directly or not (imports inside functions
  included), is a file listed in the stage's `deps` or lies in a folder listed there.
- params: every params key the stage's `run()` reads, recorded while the real stages run on a tiny
  profile, is covered by the stage's `params` (or by params.yaml itself as a file dependency).

Exempt from both: the MLflow wiring (sharpkd.tracking, tracking.* params). It records what a stage
did but never changes its outputs; listing it would rerun the whole pipeline when only the
logging changes.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, NullTracker, tiny_params
from sharpkd.config import Params, flatten

SRC = REPO / "src"
EXEMPT_MODULES = ("sharpkd.tracking",)
EXEMPT_PARAMS = ("tracking",)
STAGES = ["check_params", "download", "degrade", "teacher", "cache_teacher", "distill", "evaluate", "export"]


def dvc_stages(dvc_yaml: Path = REPO / "dvc.yaml") -> dict:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def entry_file(cmd: str, root: Path = REPO) -> Path:
    """The Python file a stage's cmd runs: `python -m sharpkd.stages.x` or `python path/x.py`."""
    argv = shlex.split(cmd)
    if "-m" in argv:
        return module_file(argv[argv.index("-m") + 1])
    script = next(a for a in argv[1:] if a.endswith(".py"))
    return root / script


def module_file(name: str) -> Path | None:
    """The file of module `name`; None for a namespace package (a folder without __init__.py)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"module {name} not found"
    return Path(spec.origin).resolve() if spec.has_location else None


def _imported(path: Path) -> set[str]:
    """sharpkd modules imported anywhere in `path` (top level and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "sharpkd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sharpkd":
            names.add(node.module)
            if _is_package(node.module):  # `from sharpkd import tracking` imports a module
                names |= {
                    f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")
                }
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def import_closure(entry: Path) -> set[Path]:
    """Files of every sharpkd module reachable from `entry` by imports."""
    seen: set[Path] = set()
    todo = [entry.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported(path):
            path = module_file(name)
            if path is not None and not name.startswith(EXEMPT_MODULES):
                todo.append(path)
    return seen


def covered(path: Path, deps: list[str], root: Path = REPO) -> bool:
    return any(path == (root / d).resolve() or (root / d).resolve() in path.parents for d in deps)


def test_every_stage_runs_its_own_module():
    stages = dvc_stages()
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"PYTHONPATH=src python stages/{name}.py", name
        assert (REPO / "stages" / f"{name}.py").is_file(), name


def test_stages_import_the_code_of_the_copy_they_run_in(tmp_path):
    """`dvc exp run --queue` runs each experiment in a copy of the repo; its stages must import that
    copy's src/, not the workspace's editable install, or editing the workspace while a queue runs
    would change experiments that DVC records with the code hashes of the queued commit."""
    copy = tmp_path / "copy"
    (copy / "src" / "sharpkd").mkdir(parents=True)
    (copy / "src" / "sharpkd" / "__init__.py").write_text("")
    prefix = dvc_stages()["distill"]["cmd"].split(" python ")[0]
    probe = f"{prefix} {sys.executable} -c 'import sharpkd; print(sharpkd.__file__)'"
    out = subprocess.run(probe, shell=True, cwd=copy, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).resolve() == (copy / "src" / "sharpkd" / "__init__.py").resolve()


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_every_imported_module(stage):
    spec = dvc_stages()[stage]
    deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
    files = import_closure(entry_file(spec["cmd"]))
    missing = sorted(str(f.relative_to(REPO)) for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r}: deps miss code it imports: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_deps_list_no_code_the_stage_does_not_import(stage):
    """The other direction: a listed source file that the stage never imports reruns it for nothing."""
    spec = dvc_stages()[stage]
    files = import_closure(entry_file(spec["cmd"]))
    for dep in (d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("src/")):
        path = (REPO / dep).resolve()
        used = path in files or any(path in f.parents for f in files)
        assert used, f"dvc.yaml stage {stage!r} lists {dep}, which it does not import"


def test_check_params_runs_on_any_edit_of_params_yaml():
    """The first stage depends on the file, not on keys, so `dvc repro` validates every edit of it."""
    spec = dvc_stages()["check_params"]
    assert "params.yaml" in spec["deps"] and not spec.get("params")
    assert not any(spec.get(k) for k in ("outs", "metrics", "plots")), "a check writes nothing"


def test_declared_params_exist():
    known = set(flatten(tiny_params()))
    for name, spec in dvc_stages().items():
        for key in spec.get("params", []):
            assert any(k == key or k.startswith(key + ".") for k in known), f"{name}: unknown param {key}"


# ------------------------------------------------------------------ params read, recorded


def recording(obj, log: set[str], prefix: str = ""):
    """A copy of a frozen params dataclass that adds every leaf key read to `log` (and stays a dataclass:
    isinstance, dataclasses.asdict and flatten work on it, and record what they read)."""
    cls = type(obj)

    def getattribute(self, name):
        value = object.__getattribute__(self, name)
        if name in cls.__dataclass_fields__ and not dataclasses.is_dataclass(value):
            log.add(prefix + name)
        return value

    sub = type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": getattribute})
    new = object.__new__(sub)
    for f in dataclasses.fields(obj):
        value = object.__getattribute__(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = recording(value, log, f"{prefix}{f.name}.")
        object.__setattr__(new, f.name, value)
    return new


def test_recording_sees_reads_through_groups():
    log: set[str] = set()
    p = recording(tiny_params(), log)
    assert isinstance(p, Params)
    loss = p.loss
    _ = loss.kd, p.data.scale
    assert log == {"loss.kd", "data.scale"}
    flatten(p.degradation)
    assert "degradation.jpeg_prob" in log


@pytest.fixture(scope="module")
def params_read(tmp_path_factory) -> dict[str, set[str]]:
    """Run the seven stages for real on a tiny profile, each with a recording params object."""
    from sharpkd.pipeline import StagePaths

    root = tmp_path_factory.mktemp("pipeline")
    params = tiny_params(eval={"lpips": False, "speed_repeats": 1, "compare_images": 1})
    reads = {}
    for stage in STAGES:
        module = importlib.import_module(f"stages.{stage}")
        log: set[str] = set()
        module.run(recording(params, log), StagePaths.under(root), NullTracker())
        reads[stage] = log
    return reads


@pytest.mark.parametrize("stage", STAGES)
def test_params_cover_every_key_read(stage, params_read):
    spec = dvc_stages()[stage]
    declared = spec.get("params", [])
    read = {k for k in params_read[stage] if not k.startswith(EXEMPT_PARAMS)}
    assert read, f"{stage} read no params at all: the recording does not work"
    if "params.yaml" in spec.get("deps", []):
        return  # the whole file is a dependency: any edit of any key reruns the stage
    missing = sorted(k for k in read if not any(k == d or k.startswith(d + ".") for d in declared))
    assert not missing, f"dvc.yaml stage {stage!r}: params miss keys its code reads: {missing}"
