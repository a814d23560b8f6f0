"""What a run records about where it came from: git state, the pipeline execution, dvc.yaml's stages."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sharpkd.errors import UserError


def git(*args: str) -> str:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the workspace the stage runs in.

    DVC itself edits dvc.lock and the .gitignore files beside outputs during a run: those do not count.
    """
    commit = git("rev-parse", "HEAD")
    changed = git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)dvc.lock",
        ":(exclude,glob)**/.gitignore",
    )
    dirty = bool(commit and changed)
    return commit, dirty


def execution_key() -> str:
    """What identifies the pipeline execution this stage belongs to (see the module docstring)."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return f"exp:{name}"
    import psutil

    me = psutil.Process()
    for proc in me.parents():
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
            return f"dvc:{proc.pid}:{proc.create_time():.0f}"
    return f"proc:{me.pid}:{me.create_time():.0f}"


def dvc_stages(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, dict]:
    """The stages of dvc.yaml in pipeline order ({} when there is none)."""
    try:
        data = yaml.safe_load(dvc_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    stages = data.get("stages") or {}
    return {"__plots__": {"plots": data.get("plots") or []}, **stages} if stages else {}


def param_text(value: Any) -> str:
    # The spelling `dvc exp run -S key=value` and params.yaml use: true, [70, 95], {}.
    return value if isinstance(value, str) else json.dumps(value)


def stage_params(flat: dict[str, Any], stage_def: dict) -> dict[str, Any]:
    """The flattened params a dvc.yaml stage depends on (all of them when it lists none)."""
    names = [p for p in stage_def.get("params") or [] if isinstance(p, str)]
    if not names:
        return flat
    return {k: v for k, v in flat.items() if any(k == n or k.startswith(n + ".") for n in names)}


def numeric_only(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if v is not None and isinstance(v, int | float) and not isinstance(v, bool)
    }


def describe_error(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    # A file name that is not UTF-8 (lone surrogates) would make SQLite refuse the whole tag.
    return text.encode("utf-8", "backslashreplace").decode()[:7000]


def chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def device_tag() -> str:
    # Only a stage that imported torch can have used a GPU.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


PROCESS_TAG = "sharpkd.process"


def process_tag() -> str:
    """`host:pid:start time` of this process: a later one can tell whether it still runs."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.0f}"


def gone(tag: str) -> bool:
    """Whether the process named by a PROCESS_TAG value has ended (False when it cannot be told:
    another host, or a tag from elsewhere)."""
    import psutil

    try:
        host, pid, start = tag.rsplit(":", 2)
        pid, start = int(pid), float(start)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(pid).create_time() - start) > 1  # a new process with a reused pid
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
