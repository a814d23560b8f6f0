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

An outbox is read as untrusted (docs/reliability.md, round 4): every line is checked before the first is
sent. A file it names must be a copy inside its own `files/` (no absolute path, no `..`, no link), an
artifact's destination a relative path; a damaged line (other than a last line cut short by a kill) or
header, or an operation outside these rules, sends nothing from that outbox: one warning names the
line, the folder is kept, and `python -m sharpkd.tracking` exits 1.
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
from sharpkd.tracking.ops import APPLY, FILE_FIELDS, apply_op

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


class DamagedOutbox(Exception):
    """An outbox that cannot be sent as it is: the message names the line and what is wrong."""


def _header(folder: Path) -> dict:
    with (folder / OPS).open("rb") as f:
        try:
            header = json.loads(f.readline())  # bytes: only this line is decoded
        except ValueError as exc:
            raise DamagedOutbox(f"its header (line 1) is damaged ({exc})") from None
    if not isinstance(header, dict) or header.get("op") != "header":
        raise DamagedOutbox("its first line is not the outbox's header")
    return header


def _inside(folder: Path, value: object, what: str) -> None:
    """DamagedOutbox unless `value` names a copy kept in `folder`/files (a folder: holding no link)."""
    if not isinstance(value, str) or not value:
        raise DamagedOutbox(f"{what} is not a file name")
    rel = Path(value)
    files = (folder / "files").resolve()
    if rel.is_absolute() or ".." in rel.parts or not (folder / rel).resolve().is_relative_to(files):
        raise DamagedOutbox(f"{what} {value!r} is not a copy kept in the outbox's files/")
    path = folder / rel
    if path.is_symlink() or (path.is_dir() and any(p.is_symlink() for p in path.rglob("*"))):
        raise DamagedOutbox(f"{what} {value!r} is or holds a link")


def _check_op(folder: Path, op: object) -> None:
    """DamagedOutbox unless `op` is an operation this project writes, its files copies in the outbox."""
    if not isinstance(op, dict) or op.get("op") not in APPLY or not isinstance(op.get("run"), str):
        raise DamagedOutbox("it is not an operation of a known kind with a run id")
    for key in FILE_FIELDS:
        if op.get(key) is not None:
            _inside(folder, op[key], f"its {key}")
    dest = op.get("dest")
    if dest is not None and not (
        isinstance(dest, str)
        and not Path(dest).is_absolute()
        and ".." not in Path(dest).parts
        and "\\" not in dest
    ):
        raise DamagedOutbox(f"its artifact destination {dest!r} is not a relative path inside the run")


def _lines(folder: Path) -> list[str]:
    """The header and operations of an outbox, each checked (DamagedOutbox naming the line otherwise). A
    last line cut short (no newline: its writer was killed while writing it) is left out."""
    data = (folder / OPS).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DamagedOutbox(f"line {line} is not UTF-8 text") from None
    lines = text.split("\n")
    last = lines.pop()  # "" after a final newline
    if last:
        with contextlib.suppress(ValueError):
            json.loads(last)  # whole, though its newline is missing: kept
            lines.append(last)
    if not lines:
        raise DamagedOutbox("it has no header")
    _header(folder)
    for number, line in enumerate(lines[1:], start=2):
        try:
            _check_op(folder, json.loads(line))
        except ValueError as exc:
            raise DamagedOutbox(f"line {number} is damaged ({exc})") from None
        except DamagedOutbox as exc:
            raise DamagedOutbox(f"line {number}: {exc}") from None
    return lines


def send_kept(client, folder: Path) -> list[str]:
    """Send an outbox's operations in order and remove it; returns what the store refused.

    When a call fails otherwise (the store is gone again) the operations not yet sent stay in the
    outbox and the error is raised. A damaged outbox (_lines) raises DamagedOutbox before anything is sent.
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
        except DamagedOutbox as exc:
            notes.append(_damaged(folder, root, exc))
            continue
        except (OSError, ValueError):
            continue  # not an outbox (yet): a stage creating it this instant, or a stray file
        if header.get("store") != client.store.uri or not gone(header.get("process", "")):
            continue
        try:
            with FileLock(str(folder / "lock"), timeout=0):
                if not (folder / OPS).is_file():
                    continue  # another stage sent it meanwhile
                refused = send_kept(client, folder)
        except (Timeout, FileNotFoundError):
            continue
        except DamagedOutbox as exc:
            notes.append(_damaged(folder, root, exc))
            continue
        except Exception as exc:
            notes.append(f"warning: tracking: {shown(folder, root)} is still kept: {short_reason(exc)}")
            break
        note = f"tracking: sent what the {header.get('stage')} stage had kept in {shown(folder, root)}"
        notes.append(note + (f" ({len(refused)} refused: {'; '.join(refused)})" if refused else ""))
    return notes


def _damaged(folder: Path, root: Path, exc: DamagedOutbox) -> str:
    return (
        f"warning: tracking: {shown(folder, root)}{OPS}: {exc}; nothing was sent from it and it is kept: "
        "repair or remove that folder"
    )


def shown(folder: Path, root: Path) -> str:
    """A folder as the user is told of it: relative to the project root when inside it."""
    with contextlib.suppress(ValueError):
        folder = folder.relative_to(root)
    return f"{folder.as_posix()}/"
