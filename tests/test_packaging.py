"""pyproject.toml declares every third-party package the code imports (none arrives by accident)."""

from __future__ import annotations

import ast
import re
import sys

import tomllib

from helpers import REPO

# import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
}


def imported_packages(folder) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("sharpkd", "__future__")}


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]
    declared = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in every}
    needed = {DISTRIBUTIONS.get(n, n).lower() for n in imported_packages(REPO / "src" / "sharpkd")}
    assert needed - declared == set(), f"imported but not in pyproject.toml: {sorted(needed - declared)}"


def test_no_import_cycle_between_sharpkd_modules():
    from test_dvc_yaml import _imported

    src = REPO / "src"
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (src / "sharpkd").rglob("*.py")
    }
    # Edges to a module's own parent packages are how Python imports it, not a dependency.
    graph = {
        m: {n for n in _imported(p) if n in modules and n != m and not m.startswith(n + ".")}
        for m, p in modules.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path[path.index(n) :] + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def _top_level_imports(path) -> set[str]:
    """Third-party packages `path` imports when it is imported (module level, not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("sharpkd", "__future__")}


def test_the_deploy_wing_needs_only_the_light_install():
    """What sharpkd.deploy imports at import time is what `pip install sharpkd` installs (no extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    light = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    for path in (REPO / "src" / "sharpkd" / "deploy").rglob("*.py"):
        needed = {DISTRIBUTIONS.get(n, n).lower() for n in _top_level_imports(path)}
        assert needed <= light, f"{path.name} imports {sorted(needed - light)}, not in the light install"
    assert "torch" not in light and "mlflow" not in light


GUARD = """
import sys
from pathlib import Path

import numpy as np

import sharpkd.deploy as deploy

model = deploy.load_model(sys.argv[1])
out = deploy.sharpen_array(np.full((40, 52, 3), 120, np.uint8), model, tile=32, overlap=4)
assert out.shape == (40, 52, 3) and out.dtype == np.uint8
deploy.sharpen_file(sys.argv[2], Path(sys.argv[3]), model)
assert Path(sys.argv[3]).stat().st_size > 0
allowed = {"sharpkd", "sharpkd.errors", "sharpkd.files"}
loaded = {m for m in sys.modules if m == "sharpkd" or m.startswith("sharpkd.")}
pipeline = sorted(m for m in loaded if m not in allowed and not m.startswith("sharpkd.deploy"))
heavy = sorted(m for m in ("torch", "torchvision", "mlflow", "dvc", "cv2", "skimage", "yaml") if m in sys.modules)
print("pipeline:", pipeline, "heavy:", heavy)
assert not pipeline and not heavy
"""


def test_sharpening_imports_no_torch_and_no_pipeline_module(tmp_path):
    """A subprocess imports sharpkd.deploy, sharpens an image and a clip, and has loaded neither torch nor
    any pipeline module (config, data, train, losses, models, teachers, tracking...)."""
    import subprocess

    import numpy as np

    from helpers import write_clip
    from sharpkd.models.student import Student
    from sharpkd.onnx_export import export_onnx

    onnx = export_onnx(Student(scale=2, channels=4, blocks=1).eval(), tmp_path / "s.onnx")
    frames = [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(3)]
    clip = write_clip(tmp_path / "c.mp4", frames, audio=True)
    res = subprocess.run(
        [sys.executable, "-c", GUARD, str(onnx), str(clip), str(tmp_path / "c_sharp.mp4")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
