"""Hardening, round 3: input folders that overlap the pipeline's outputs or its held-out images, file
names at the file system's limit or with `$`, control characters, `<`, `|` in them, unreadable folder
entries, and a teacher cache changed behind DVC's back. Each case gives one line naming the file or
key and what to do; the pipeline's own stages, real files and real processes throughout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import sharpkd
from helpers import REPO, deep_update, repo_params_dict
from sharpkd.config import ConfigError, params_from_dict
from sharpkd.data import store
from sharpkd.deploy.images import printable, save_image
from sharpkd.errors import UserError
from sharpkd.files import _TEMP, atomic_dir, atomic_path, remove_stale_temps

SRC = Path(sharpkd.__file__).parents[1]  # the sharpkd under test, for the processes the tests start
ENV = {**os.environ, "PYTHONPATH": str(SRC)}


def _params(**override) -> dict:
    return deep_update(repo_params_dict(), override)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------- (4) folders that overlap


def _check_params(repo: Path, params: dict) -> subprocess.CompletedProcess:
    """`stages/check_params.py` as DVC runs it, in `repo` (its working directory: the repository root)."""
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(
        [sys.executable, str(REPO / "stages/check_params.py")],
        cwd=repo,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_teacher_only_folder_inside_the_outputs_stops_check_params(tmp_path):
    """The issue's case: `data.teacher_only.folder: data` (relative) with a fraction of 0.1."""
    repo = tmp_path / "repo"
    save_image(repo / "data/pairs/valid/hr/0001.png", np.zeros((8, 8, 3), np.uint8))
    proc = _check_params(
        repo, _params(data={"teacher_only": {"folder": "data"}}, distill={"teacher_only_fraction": 0.1})
    )
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert line.startswith("error [check_params]: params: 'data.teacher_only.folder' = 'data'")
    assert f"output folder data/ ({repo / 'data'})" in line and "use a folder outside data/" in line


@pytest.mark.parametrize(
    "key,value,names",
    [
        ("data.teacher_only.folder", "link", ["output folder data/"]),  # a link into data/raw/valid
        ("data.teacher_only.folder", "/", ["output folder data/"]),  # around the outputs
        ("data.teacher_only.folder", "~", ["output folder data/"]),  # the repository lies in it
        ("eval.sets.mine", "metrics/compare", ["'eval.sets.mine'", "output folder metrics/"]),
        ("eval.sets.root", "/", ["'eval.sets.root'", "output folder data/"]),
        ("data.teacher_only.folder", "photos/valid", ["'data.folder.valid' = 'photos/valid'"]),
        ("data.teacher_only.folder", "photos", ["'data.folder.valid'"]),
        ("eval.sets.Set5", "photos/train/set5", ["'data.folder.train' = ", "'eval.sets.Set5'"]),
        ("data.folder.valid", "photos/train/valid", ["'data.folder.train' = ", "'data.folder.valid'"]),
    ],
)
def test_input_folders_that_overlap_are_refused_when_params_load(key, value, names, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "data/raw/valid").mkdir(parents=True)
    (repo / "link").symlink_to(repo / "data/raw/valid")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HOME", str(tmp_path))
    base = {
        "data": {
            "source": "folder",
            "folder": {"train": "photos/train", "valid": "photos/valid"},
            "teacher_only": {"upcycle": ["zoom_in"]},
        },
        "distill": {"teacher_only_fraction": 0.1},
        "eval": {"sets": {"Set5": "testsets/Set5"}},
    }
    params_from_dict(_params(**base))  # nothing overlaps
    *parents, leaf = key.split(".")
    override = deep_update(base, {})
    target = override
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
    with pytest.raises(ConfigError) as err:
        params_from_dict(_params(**override))
    message = str(err.value)
    assert message.count("\n") == 0 and f"'{key}'" in message, message
    assert all(n in message for n in names), message


def test_folders_apart_are_accepted_and_nothing_is_listed(tmp_path, monkeypatch):
    """Siblings (the profiles' layout), and folders that do not exist: params loading is path work only."""
    monkeypatch.chdir(tmp_path)
    p = params_from_dict(
        _params(
            data={
                "source": "folder",
                "folder": {"train": "../shared/trainsets", "valid": ""},
                "teacher_only": {"folder": "../shared/domains/Manga109/unlabeled_x4"},
            },
            distill={"teacher_only_fraction": 0.1},
            eval={"sets": {"Set5": "../shared/testsets/Set5/HR", "M": "../shared/domains/Manga109/test/HR"}},
        )
    )
    assert p.data.teacher_only.folder.endswith("unlabeled_x4")
    # Keys a source does not read are not checked: data.folder.* with data.source samples.
    params_from_dict(_params(data={"folder": {"train": "data", "valid": "data"}}))


# ------------------------------------------------------------------- (5) file names


@pytest.mark.parametrize(
    "name", ["a" * 240 + ".png", "é" * 125 + ".png", "b" * 255, "c" * 20 + "." + "x" * 234]
)
def test_a_legal_long_name_fits_its_temporary(name, tmp_path):
    assert len(os.fsencode(name)) <= os.pathconf(tmp_path, "PC_NAME_MAX")
    save_image(tmp_path / "img.png", np.zeros((4, 4, 3), np.uint8))
    with atomic_path(tmp_path / name) as tmp:
        assert _TEMP.fullmatch(tmp.name) and tmp.name.startswith(".") and f".{os.getpid()}-" in tmp.name
        assert len(os.fsencode(tmp.name)) <= os.pathconf(tmp_path, "PC_NAME_MAX")
        tmp.write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x"
    for content in (b"1", b"2"):  # the second replaces the first through `.<name>.old`
        with atomic_dir(tmp_path / "d" / name) as tmp:
            (tmp / "f").write_bytes(content)
    assert (tmp_path / "d" / name / "f").read_bytes() == b"2"
    assert os.listdir(tmp_path / "d") == [name]
    assert sorted(os.listdir(tmp_path)) == sorted(["d", "img.png", name])


def test_an_image_with_a_long_name_is_saved(tmp_path):
    """The issue's case: a 240-character output name (what `sharpkd sharpen -o` or an eval set can ask)."""
    path = tmp_path / ("s" * 236 + ".png")
    save_image(path, np.full((5, 6, 3), 7, np.uint8))
    assert path.is_file() and os.listdir(tmp_path) == [path.name]


KILLED = """
import os, sys
from sharpkd.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    print(tmp.name, flush=True)
    os.kill(os.getpid(), 9)
"""


def test_a_killed_writers_long_temporary_is_still_removed(tmp_path):
    target = tmp_path / ("k" * 250 + ".json")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, str(target)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    left = tmp_path / proc.stdout.strip()
    assert left.is_file() and _TEMP.fullmatch(left.name)
    assert remove_stale_temps(tmp_path) == [left] and not left.exists()
    # .gitignore's patterns still cover it
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", f"x/{left.name}"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 0


def test_printable_escapes_control_characters_and_keeps_the_rest():
    assert printable("a\x1b[31mred\nx\r\t\u202e.png") == "a\\x1b[31mred\\nx\\r\\t\\u202e.png"
    assert printable("é漢 $5_and_$10 <b>.png") == "é漢 $5_and_$10 <b>.png"
    assert printable(os.fsdecode(b"\xff\n.png")) == "\\xff\\n.png"


def test_figure_titles_take_dollars(tmp_path):
    """`$5_and_$10.png` in a set: matplotlib's mathtext failed on the title after all the scoring."""
    from sharpkd.report import save_compare

    crop = np.zeros((8, 8, 3), np.uint8)
    item = {
        "image": "$5_and_$10 \\frac{",
        "at": (0, 0, 8),
        "crops": {k: crop for k in ("bicubic", "student", "teacher", "hr")},
        "psnr": {"bicubic": 20.0, "student": 21.0, "teacher": 22.0},
    }
    save_compare(tmp_path / "c.png", "odd", item, 2)
    assert (tmp_path / "c.png").stat().st_size > 1000


# ------------------------------------------------------------------- (9) the stores


def test_a_truncated_store_array_is_one_line(tmp_path):
    images = [np.full((4, 6, 3), i, np.uint8) for i in range(3)]
    sizes = [im.shape[:2] for im in images]
    written = store.create(tmp_path / "train_lr.npy", sizes)
    for i, im in enumerate(images):
        written.write(i, im)
    written.close()
    with open(tmp_path / "train_lr.npy", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "train_lr.npy") - 10)
    with pytest.raises(UserError) as err:
        store.open_images(tmp_path / "train_lr.npy", sizes, channels=3)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "train_lr.npy")) and "mmap length is greater" in message
    assert "dvc repro -f degrade" in message and message.count("\n") == 0
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(UserError, match="empty.npy cannot be read as a .npy array"):
        store.load_flat(tmp_path / "empty.npy", "cache_teacher")


# ------------------------------------------------------------------- (10) unreadable entries

UNREADABLE = """
import json, sys
from pathlib import Path
from sharpkd.data.evalsets import extra_set_images
from sharpkd.deploy.images import list_image_folder
from helpers import degradation_params
problems = []
names = [im.name for im in extra_set_images("mine", sys.argv[1], 2, degradation_params(), 0, 8, problems)]
print(json.dumps({"names": names, "problems": problems, "listed": [p.name for p in list_image_folder(sys.argv[1], "data.folder.train")]}))
"""


def _without_dac_override() -> list[str]:
    """A prefix that runs a command unable to bypass file permissions (root reads anything otherwise)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to make a folder unreadable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_entries_of_a_set_are_skipped_and_named(tmp_path):
    folder = tmp_path / "set"
    rng = np.random.default_rng(0)
    for rel in ("good.png", "locked/a.png", "closed/b.png"):
        save_image(folder / rel, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (folder / "locked").chmod(0o600)  # listed, but its entries cannot be looked at
    (folder / "closed").chmod(0o000)  # not even listed
    try:
        proc = subprocess.run(
            [*_without_dac_override(), sys.executable, "-c", UNREADABLE, str(folder)],
            env={**ENV, "PYTHONPATH": f"{SRC}:{REPO / 'tests'}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        (folder / "locked").chmod(0o755)
        (folder / "closed").chmod(0o755)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["names"] == ["good"]
    problems = "\n".join(out["problems"])
    assert f"eval.sets.mine: {folder / 'closed'}: cannot be read (Permission denied)" in problems
    assert "locked/a.png" in problems and "Permission denied" in problems
    assert (
        f"[data.folder.train] skipped {folder / 'closed'}: cannot be read (Permission denied)" in proc.stderr
    )


# ------------------------------------------------------------------- issue 40 (hardening, round 4)


@pytest.mark.parametrize(
    ("target", "names"),
    [
        ("data/raw/valid/coffee.png", "the pipeline's output folder data/"),
        ("sets/Set5/coffee.png", "'eval.sets.Set5'"),
        ("valid/coffee.png", "'data.folder.valid'"),
    ],
)
def test_row13_a_file_link_into_a_held_out_or_output_folder_is_refused(tmp_path, monkeypatch, target, names):
    """A file symlink inside data.teacher_only.folder that resolves into a held-out or output folder is
    refused by degrade's first check, naming the link, as such a folder is; a link elsewhere is fine."""
    from sharpkd.data.teacher_only import scan_teacher_only

    monkeypatch.chdir(tmp_path)
    image = np.full((96, 96, 3), 120, np.uint8)
    for name in (
        "data/raw/valid/coffee.png",
        "sets/Set5/coffee.png",
        "valid/coffee.png",
        "elsewhere/own.png",
    ):
        save_image(tmp_path / name, image)
    footage = tmp_path / "footage"
    save_image(footage / "mine.png", image)
    (footage / "linked.png").symlink_to(tmp_path / "elsewhere/own.png")
    p = params_from_dict(
        _params(
            data={
                "source": "folder",
                "folder": {"train": str(tmp_path / "train"), "valid": str(tmp_path / "valid")},
                "teacher_only": {"folder": str(footage)},
            },
            distill={"teacher_only_fraction": 0.1},
            eval={"sets": {"Set5": "sets/Set5"}},
        )
    )
    assert len(scan_teacher_only(p).rows) == 2, "a link to a file outside them is an input like any other"
    (footage / "sub").mkdir()
    (footage / "sub" / "coffee.png").symlink_to(tmp_path / target)
    with pytest.raises(ConfigError) as err:
        scan_teacher_only(p)
    message = _one_line(str(err.value))
    assert "sub/coffee.png" in message and names in message and "remove the link" in message, message
