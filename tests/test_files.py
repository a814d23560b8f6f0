"""Atomic outputs (files.py): leftovers of a killed writer are removed by the next one, a live
writer's are not; `overwrite=False` never replaces a file another process wrote meanwhile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sharpkd.files import atomic_dir, atomic_path, remove_stale_temps

KILLED_WRITER = """
import os, sys, time
from sharpkd.files import atomic_dir, atomic_path
with atomic_dir(sys.argv[1]) as tmp, atomic_path(sys.argv[2]) as tmp_file:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    print(os.getpid(), tmp.name, tmp_file.name, flush=True)
    os.kill(os.getpid(), 9)  # kill -9: no cleanup runs
"""


def test_a_killed_writers_temporaries_go_when_the_output_is_next_written(tmp_path):
    out, one = tmp_path / "data" / "raw", tmp_path / "data" / "raw.json"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out), str(one)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    pid, *names = proc.stdout.split()
    left_dir, left_file = (out.parent / n for n in names)
    assert left_dir.is_dir() and left_file.is_file() and not out.exists()
    assert left_dir.name.startswith(f".raw.{pid}-")  # the writer's pid is in the name

    # A live writer's temporary beside it (this process) is left alone.
    with atomic_path(out.parent / "other.json") as live:
        live.write_text("{}")
        with atomic_dir(out) as tmp:
            (tmp / "a.png").write_bytes(b"png")
        assert live.exists()
    assert not left_dir.exists(), "the killed writer's folder is still there"
    assert not left_file.exists(), "the killed writer's file is still there"
    assert (out / "a.png").read_bytes() == b"png" and (out.parent / "other.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["other.json", "raw"]


def test_remove_stale_temps_leaves_other_names(tmp_path):
    names = [".raw.old", "raw.1234-abcdefgh.tmp", ".notes.txt", ".raw.tmp"]
    for n in names:
        (tmp_path / n).write_text("")
    assert remove_stale_temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_no_overwrite_keeps_a_file_written_meanwhile(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(FileExistsError, match="out.png"):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("mine")
            target.write_text("another run's")  # created after this writer checked, before it finished
    assert target.read_text() == "another run's"
    assert os.listdir(tmp_path) == ["out.png"]  # no temporary left either
    with atomic_path(tmp_path / "new.png", overwrite=False) as tmp:
        tmp.write_text("mine")
    assert (tmp_path / "new.png").read_text() == "mine"
