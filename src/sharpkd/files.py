"""Atomic writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700; finished outputs get the usual umask-based modes instead,
# so DVC caches and other users see them like any other file.
_UMASK = _umask()


# Temporaries are named `.<name>.<pid>-<random>.tmp[<suffix>]` beside their target: the pid of the
# writer is in the name, so a later writer can tell a killed one's leftovers from a live one's.
# `<name>` is shortened where the whole would not fit the file system's name limit (`_fit`).
_TEMP = re.compile(r"\..+\.(\d+)-[a-z0-9_]{8}\.tmp(\.[^.]*)?")
_RANDOM = 8  # characters tempfile puts between prefix and suffix


def _name_max(folder: Path) -> int:
    """The longest file name `folder` takes, in bytes (255 on the usual file systems)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _fit(name: str, room: int) -> str:
    """`name` if it takes at most `room` bytes, else its start and `~` + a hash of the whole (12 bytes
    less), cut on a character boundary, so that two long names sharing a start stay apart."""
    if len(os.fsencode(name)) <= room:
        return name
    mark = f"~{zlib.crc32(os.fsencode(name)):08x}"
    cut = name[: max(room - len(mark), 1)]
    while len(cut) > 1 and len(os.fsencode(cut)) > room - len(mark):
        cut = cut[:-1]
    return cut + mark


def _temp_names(path: Path, tail: str) -> tuple[str, str]:
    """(prefix, suffix) of a temporary beside `path` ending in `tail` (`.tmp` + a suffix): the name
    part shortened until the whole name, random part included, fits the folder's name limit."""
    pid = f".{os.getpid()}-"
    room = _name_max(path.parent) - 1 - len(pid) - _RANDOM  # 1: the leading dot
    tail = _fit(tail, room // 2) if len(os.fsencode(tail)) > room // 2 else tail
    return f".{_fit(path.name, room - len(os.fsencode(tail)))}{pid}", tail


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporaries in `folder` whose writer no longer runs (killed, crashed); return them.

    Only this folder's own entries are looked at; a temporary of a live process (another run
    writing beside this one) is left alone.
    """
    import psutil

    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.fullmatch(entry.name)
        if m is None or psutil.pid_exists(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    With `overwrite=False` the rename fails with FileExistsError when `path` exists by then,
    even if another process created it a moment before (no check-then-write race).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_names(path, ".tmp" + path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rename_new(tmp: Path, path: Path) -> None:
    """`tmp` -> `path` only if `path` does not exist: a hard link fails atomically on a taken name."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists") from None
    except OSError:  # a filesystem without hard links: check, then rename (a small race remains)
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; it replaces `path` only if the block succeeds.

    Leftovers of a killed earlier writer beside `path` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{_fit(path.name, _name_max(path.parent) - 5)}.old")
    remove_stale_temps(path.parent)
    # Only ever left behind by a kill between the two renames below (one writer per output).
    shutil.rmtree(old, ignore_errors=True)
    prefix, suffix = _temp_names(path, ".tmp")
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
