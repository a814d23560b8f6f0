"""When the store stops answering in the middle of a stage: what cannot be logged is kept on disk and
sent when it answers again, so tracking never costs training.

The first store call that fails (a server that is gone or hangs, an SQLite file that cannot be
written) puts the stage's tracker offline: it calls the store no more, and every later operation
(ops.py: metrics, params, tags, artifacts, the model, the end of the runs) goes to an outbox,
<root>/metrics/unlogged/<stage>-<run id>/: `ops.jsonl` (a header naming the store, the stage, its
runs and its process, then one operation a line, written at once) and `files/` (a copy of each
artifact, taken when it was logged). At its end the stage tries the store once more and sends the
outbox if it answers; otherwise the next stage that reaches the same store sends it (outboxes whose
process has ended), in order, and removes the folder. An operation the store refuses then (a run
deleted meanwhile) is skipped and named; one that fails again leaves the rest kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from sharpkd.tracking.context import gone, process_tag
from sharpkd.tracking.ops import FILE_FIELDS, apply_op

UNLOGGED = Path("metrics") / "unlogged"
OPS = "ops.jsonl"
# What a store answers for an operation it will never take (a run deleted meanwhile): skipped when sent.
REFUSALS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"}


def short_reason(exc: BaseException) -> str:
    """The useful part of a store error, on one line: `Connection refused` rather than a page of
    urllib3 wrappers."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return errno.group(1).strip()
    if "timed out" in text or "timeout" in text.lower():
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '?')} s"
    return text[:300]


class Outbox:
    """The operations a tracker could not send, kept in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, header: dict):
        self.folder = folder
        (folder / "files").mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._write({**header, "op": "header", "process": process_tag(), "time": time.time()})

    def add(self, op: dict, objects: dict | None = None) -> None:
        op = dict(op)
        for key in FILE_FIELDS:
            if op.get(key):
                op[key] = self._keep(Path(op[key]))
        example = (objects or {}).get("example")
        if example is not None:
            import numpy as np

            dest = self._slot() / "example.npy"
            np.save(dest, np.asarray(example))
            op["example"] = dest.relative_to(self.folder).as_posix()
        self._write(op)

    def _slot(self) -> Path:
        self._count += 1
        slot = self.folder / "files" / str(self._count)
        slot.mkdir()
        return slot

    def _keep(self, path: Path) -> str | None:
        """A copy of the file or folder at `path` (None when it is gone), relative to the outbox."""
        dest = self._slot() / path.name
        if path.is_dir():
            shutil.copytree(path, dest)
        elif path.is_file():
            shutil.copy2(path, dest)
        else:
            return None
        return dest.relative_to(self.folder).as_posix()

    def _write(self, op: dict) -> None:
        with (self.folder / OPS).open("a", encoding="utf-8") as f:
            f.write(json.dumps(op, default=str) + "\n")


def _header(folder: Path) -> dict:
    with (folder / OPS).open(encoding="utf-8") as f:
        return json.loads(f.readline())


def _lines(folder: Path) -> list[str]:
    lines = []
    for line in (folder / OPS).read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
        except ValueError:  # the last line of a writer killed while writing it
            continue
        lines.append(line)
    return lines


def send_kept(client, folder: Path) -> list[str]:
    """Send an outbox's operations in order and remove it; returns what the store refused.

    When a call fails otherwise (the store is gone again) the operations not yet sent stay in the
    outbox and the error is raised.
    """
    from mlflow.exceptions import MlflowException

    header, *lines = _lines(folder)
    refused = []
    for i, line in enumerate(lines):
        op = json.loads(line)
        if "path" in op and op["path"] is None:
            refused.append(f"{op['op']}: its file was gone when it was kept")
            continue
        try:
            apply_op(client, op, folder)
        except Exception as exc:
            if not (isinstance(exc, MlflowException) and exc.error_code in REFUSALS):
                (folder / OPS).write_text("\n".join([header, *lines[i:]]) + "\n", encoding="utf-8")
                raise
            refused.append(f"{op['op']}: {short_reason(exc)}")
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # metrics/unlogged/ when it is empty
    return refused


def send_pending(client, root: Path) -> list[str]:
    """Send the outboxes under `root` that earlier stages kept for this store; lines for the user."""
    from filelock import FileLock, Timeout

    notes: list[str] = []
    base = root / UNLOGGED
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            header = _header(folder)
        except (OSError, ValueError):
            continue
        if header.get("store") != client.store.uri or not gone(header.get("process", "")):
            continue
        try:
            with FileLock(str(folder / "lock"), timeout=0):
                if not (folder / OPS).is_file():
                    continue  # another stage sent it meanwhile
                refused = send_kept(client, folder)
        except (Timeout, FileNotFoundError):
            continue
        except Exception as exc:
            notes.append(f"warning: tracking: {shown(folder, root)} is still kept: {short_reason(exc)}")
            break
        note = f"tracking: sent what the {header.get('stage')} stage had kept in {shown(folder, root)}"
        notes.append(note + (f" ({len(refused)} refused: {'; '.join(refused)})" if refused else ""))
    return notes


def shown(folder: Path, root: Path) -> str:
    """A folder as the user is told of it: relative to the project root when inside it."""
    with contextlib.suppress(ValueError):
        folder = folder.relative_to(root)
    return f"{folder.as_posix()}/"
