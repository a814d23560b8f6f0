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
    declared = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
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
