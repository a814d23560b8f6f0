"""Footage as teacher-only data (data/footage.py): video clips in data.teacher_only.folder beside images,
frames sampled per clip from the seed, listed in the manifest, under the images' size bounds and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import TINY, deep_update, git_repo_copy, repo_params_dict, run_degrade, tiny_params
from sharpkd.config import ConfigError
from sharpkd.data import footage
from sharpkd.data.degradation import center_crop, resize
from sharpkd.data.footage import frame_name, sample_clip, sample_positions
from sharpkd.deploy.images import read_rgb
from sharpkd.errors import UserError
from test_degrade import ALL_OFF, _flat_images, _photo, _raw

av = pytest.importorskip("av")


def make_clip(path: Path, frames: int = 20, size: tuple[int, int] = (48, 64), codec: str = "libx264") -> Path:
    """A small clip whose frame i is a texture brightened by 8 i: its index shows in its mean."""
    h, w = size
    path.parent.mkdir(parents=True, exist_ok=True)
    base = _photo(h, w, 11).astype(np.int64) // 2
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            rgb = np.clip(base + 8 * i, 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as clip:
        return [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]


def footage_folder(root: Path) -> Path:
    """Two good clips (H.264 MP4, MPEG-4 Part 2 MKV), an image, random bytes as .mp4, a truncated MP4."""
    folder = root / "footage"
    make_clip(folder / "clips" / "a.mp4")
    make_clip(folder / "clips" / "b.mkv", frames=6, codec="mpeg4")
    Image.fromarray(_photo(20, 30, 7)).save(folder / "c.png")
    (folder / "clips" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    good = (folder / "clips" / "a.mp4").read_bytes()
    (folder / "clips" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    return folder


def footage_params(folder: Path | str, frames_per_clip: int = 4, max_side: int = 40, seed: int = 3):
    return tiny_params(
        seed=seed,
        degradation=ALL_OFF,
        data={
            "teacher_only": {
                "folder": str(folder),
                "frames_per_clip": frames_per_clip,
                "upcycle": [],
                "max_side": max_side,
            }
        },
        distill={"teacher_only_fraction": 0.5},
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return _raw(tmp_path_factory.mktemp("raw"), [(48, 64), (40, 40)], [(40, 40)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return footage_folder(tmp_path_factory.mktemp("footage"))


# --------------------------------------------------------------------------- sampling


def test_sample_positions_spread_over_the_clip_and_follow_the_seed():
    got = sample_positions(20, 4, 3, "clips/a.mp4")
    assert got == sorted(got) and len(got) == 4
    assert [p // 5 for p in got] == [0, 1, 2, 3]  # one in each fifth-long run
    assert got == sample_positions(20, 4, 3, "clips/a.mp4")  # the same on every call
    others = {tuple(sample_positions(20, 4, s, n)) for s, n in [(4, "clips/a.mp4"), (3, "clips/b.mp4")]}
    assert tuple(got) not in others  # another seed, another clip: another draw
    assert sample_positions(3, 8, 3, "short.mp4") == [0, 1, 2]  # fewer frames than asked: all of them
    assert frame_name("clips/a.mp4", 12) == "clips/a.mp4#f0012"


def test_sample_clip_decodes_the_clip(folder):
    clip = sample_clip(folder / "clips" / "a.mp4", "clips/a.mp4", 4, 3)
    assert clip.count == 20 and clip.frames == tuple(sample_positions(20, 4, 3, "clips/a.mp4"))
    assert clip.sizes == ((48, 64),) * 4
    for bad in ("noise.mp4", "truncated.mp4"):
        with pytest.raises(footage.ClipReadError, match=bad):
            sample_clip(folder / "clips" / bad, bad, 4, 3)


# --------------------------------------------------------------------------- the degrade stage


def test_clip_frames_are_teacher_only_inputs(folder, raw, tmp_path, monkeypatch):
    """Sampled frames written like images (centre crop, student input), listed by clip and index;
    the unreadable clips skipped and listed; each clip decoded once when writing."""
    reads = []
    read_frames = footage.read_frames
    monkeypatch.setattr(footage, "read_frames", lambda p, *a: reads.append(p.name) or read_frames(p, *a))
    out = tmp_path / "pairs"
    summary = run_degrade(footage_params(folder), raw, out)

    man = pd.read_csv(out / "teacher_only_manifest.csv", dtype={"name": str})
    assert list(man.columns) == ["index", "kind", "name", "origin", "height", "width"]
    a_frames, b_frames = sample_positions(20, 4, 3, "clips/a.mp4"), sample_positions(6, 4, 3, "clips/b.mkv")
    assert man.name.tolist() == ["c.png"] + [frame_name("clips/a.mp4", i) for i in a_frames] + [
        frame_name("clips/b.mkv", i) for i in b_frames
    ]  # the folder's files in sorted order, each clip's frames in clip order
    assert man.kind.tolist() == ["unlabeled"] + ["frame"] * 8
    origins = [folder / "c.png"] + [folder / "clips" / "a.mp4"] * 4 + [folder / "clips" / "b.mkv"] * 4
    assert man.origin.tolist() == [str(p) for p in origins]
    assert man.height.tolist() == [20] + [40] * 8 and man.width.tolist() == [30] + [40] * 8  # max_side 40
    assert summary["teacher_only"] == {"unlabeled": 1, "frame": 8} and summary["unlabeled_clips"] == 2
    skipped = " ".join(summary["teacher_only_skipped"])
    assert "clips/noise.mp4: unreadable" in skipped and "clips/truncated.mp4: unreadable" in skipped
    assert len(summary["teacher_only_skipped"]) == 2
    assert reads == ["a.mp4", "b.mkv"]  # one decode per clip, one clip at a time

    sizes = list(zip(man.height, man.width, strict=True))
    t_in = _flat_images(out, "teacher_only_lr", sizes)
    s_in = _flat_images(out, "teacher_only_input", [(2 * h, 2 * w) for h, w in sizes])
    a, b = decoded(folder / "clips" / "a.mp4"), decoded(folder / "clips" / "b.mkv")
    want = [read_rgb(folder / "c.png")[0]] + [a[i] for i in a_frames] + [b[i] for i in b_frames]
    for i, got in zip(a_frames, t_in[1:5], strict=True):  # the frame at that index: 8 i brighter than frame 0
        assert abs(got.mean() - center_crop(a[0], 40).mean() - 8 * i) < 3
    for got, frame, student in zip(t_in, want, s_in, strict=True):
        np.testing.assert_array_equal(got, center_crop(frame, 40))
        np.testing.assert_array_equal(student, resize(got, (got.shape[1] * 2, got.shape[0] * 2), "bicubic"))


def test_same_seed_same_frames(folder, raw, tmp_path):
    runs = {}
    for name, seed in (("one", 3), ("again", 3), ("other", 5)):
        out = tmp_path / name
        run_degrade(footage_params(folder, seed=seed), raw, out)
        runs[name] = (
            (out / "teacher_only_manifest.csv").read_bytes(),
            (out / "teacher_only_lr.npy").read_bytes(),
        )
    assert runs["one"] == runs["again"]
    assert runs["one"][0] != runs["other"][0]  # another seed draws other frames


def test_too_small_frames_are_skipped_and_listed(raw, tmp_path):
    folder = tmp_path / "footage"
    make_clip(folder / "big.mp4", frames=5)
    make_clip(folder / "small.mp4", frames=5, size=(12, 32))  # under data.min_side / data.scale = 16
    summary = run_degrade(footage_params(folder, frames_per_clip=8, max_side=0), raw, tmp_path / "pairs")
    assert summary["teacher_only"] == {"frame": 5}  # a clip with fewer frames than asked gives all of them
    (why,) = summary["teacher_only_skipped"]
    assert why.startswith("small.mp4: 5 of its 5 sampled frames: 32x12 is smaller than") and "16" in why


@pytest.mark.parametrize("case", ["unreadable", "too_small"])
def test_no_readable_clip_is_an_error_before_any_work(case, raw, tmp_path, monkeypatch):
    import sharpkd.data.pairs as stage

    folder = tmp_path / "footage"
    folder.mkdir()
    if case == "unreadable":
        (folder / "noise.mov").write_bytes(np.random.default_rng(1).bytes(3000))
        (folder / "empty.webm").write_bytes(b"")
    else:
        make_clip(folder / "tiny.mp4", frames=3, size=(8, 8))

    def no_work(*a, **k):
        raise AssertionError("degrade started working before checking data.teacher_only.folder")

    for module, name in ((stage, "degrade_image"), (stage, "read_rgb"), (footage, "read_frames")):
        monkeypatch.setattr(module, name, no_work)
    out = tmp_path / "pairs"
    with pytest.raises(UserError) as err:
        run_degrade(footage_params(folder), raw, out)
    message = str(err.value)
    assert "data.teacher_only.folder: no usable image or clip" in message and str(folder) in message
    assert ("unreadable" if case == "unreadable" else "8x8 is smaller") in message, message
    assert not out.exists()


def test_frames_per_clip_is_checked():
    with pytest.raises(ConfigError, match="data.teacher_only.frames_per_clip"):
        tiny_params(data={"teacher_only": {"frames_per_clip": 0}})


# --------------------------------------------------------------------------- end to end, real DVC


@pytest.mark.slow
def test_dvc_exp_run_distils_on_footage(tmp_path):
    """`dvc exp run --temp -S data.teacher_only.folder=<two clips and an image> -S
    distill.teacher_only_fraction=0.5` trains; the experiment's manifest (read from it with dvc.api:
    --temp leaves the workspace as it was) lists the sampled frames."""
    from test_tracking import clean_env, dvc

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    folder = tmp_path / "footage"
    make_clip(folder / "a.mp4")
    make_clip(folder / "sub" / "b.mkv", frames=6, codec="mpeg4")
    Image.fromarray(_photo(20, 30, 7)).save(folder / "c.png")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a clip")
    quick = {
        "eval": {"lpips": False, "speed_repeats": 1, "teacher_speed_repeats": 0},
        "export": {"speed_repeats": 1, "int8": False},
    }
    repo = git_repo_copy(
        tmp_path / "repo", deep_update(deep_update(repo_params_dict(), TINY), quick), clean_env()
    )
    dvc(
        repo, "exp", "run", "--temp", "-n", "footage",
        "-S", f"data.teacher_only.folder={folder}", "-S", "distill.teacher_only_fraction=0.5",
    )  # fmt: skip
    assert not (repo / "data" / "pairs").exists()  # --temp ran it in a copy

    read = (
        "import sys, dvc.api; "
        "[sys.stdout.write(dvc.api.read(p, repo='.', rev='footage') + '\\0') for p in sys.argv[1:]]"
    )
    files = ["data/pairs/teacher_only_manifest.csv", "data/pairs/pairs.json", "metrics/train.json"]
    res = subprocess.run(
        [sys.executable, "-c", read, *files], cwd=repo, env=clean_env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    manifest, pairs_json, train_json = res.stdout.split("\0")[:3]
    rows = [line.split(",") for line in manifest.splitlines()[1:]]
    a, b = sample_positions(20, 8, 0, "a.mp4"), sample_positions(6, 8, 0, "sub/b.mkv")
    assert [r[2] for r in rows] == [frame_name("a.mp4", i) for i in a] + ["c.png"] + [
        frame_name("sub/b.mkv", i) for i in b
    ]
    assert [r[1] for r in rows] == ["frame"] * 8 + ["unlabeled"] + ["frame"] * 6
    pairs = json.loads(pairs_json)
    assert pairs["teacher_only"] == {"unlabeled": 1, "frame": 14} and pairs["unlabeled_clips"] == 2
    assert [s.split(":")[0] for s in pairs["teacher_only_skipped"]] == ["broken.mp4"]
    assert json.loads(train_json)  # distill trained and wrote its metrics
