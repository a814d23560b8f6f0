"""Small builders shared by the pipeline tests (plain functions)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import shutil
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
import yaml

from sharpkd.config import Params, params_from_dict
from sharpkd.pipeline import StagePaths
from sharpkd.tracking import NullTracker  # noqa: F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# A profile small enough for unit tests on a 2-core CPU (seconds, not minutes).
TINY = {
    "data": {
        "scale": 2,
        "min_side": 32,
        "patch_size": 32,
        "valid_max_side": 96,
        "samples": {"valid_count": 2},
    },
    "teacher": {
        "feature_channels": 4,
        "train": {
            "channels": 8,
            "blocks": 1,
            "steps": 40,
            "batch_size": 8,
            "lr": 0.002,
            "warmup_steps": 4,
            "eval_every": 10,
        },
    },
    "cache": {"pca_crop": 16},
    "student": {"channels": 8, "blocks": 1},
    "distill": {"steps": 12, "batch_size": 4, "eval_every": 6, "checkpoint_every": 4, "warmup_steps": 2},
    "infer": {"tile": 64, "overlap": 8},
    "tracking": {"enabled": False},
}


def git_repo_copy(dest: Path, params: dict, env: dict[str, str]) -> Path:
    """A git repository at `dest` holding this working tree's files (tracked and new, not ignored:
    what a developer is testing) with `params` as params.yaml and no dvc.lock, committed."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    git_env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "test profile"]):
        subprocess.run(["git", *cmd], cwd=dest, env=git_env, check=True, capture_output=True)
    return dest


def deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def repo_params_dict() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_params(**overrides) -> Params:
    return params_from_dict(deep_update(deep_update(repo_params_dict(), TINY), overrides))


def degradation_params(**overrides):
    """params.yaml's degradation group with some values changed."""
    return dataclasses.replace(params_from_dict(repo_params_dict()).degradation, **overrides)


def loss_params(**overrides):
    """params.yaml's loss group with some values changed."""
    return dataclasses.replace(params_from_dict(repo_params_dict()).loss, **overrides)


def stage_paths(root: Path, **overrides) -> StagePaths:
    """The pipeline's layout under `root`, with some folders put elsewhere."""
    return dataclasses.replace(StagePaths.under(root), **overrides)


def run_download(params: Params, raw: Path, tracker=None) -> dict:
    from stages import download

    return download.run(params, stage_paths(raw.parent, raw=raw), tracker or NullTracker())


def run_degrade(params: Params, raw: Path, pairs: Path, tracker=None) -> dict:
    from stages import degrade

    return degrade.run(params, stage_paths(pairs.parent, raw=raw, pairs=pairs), tracker or NullTracker())


def run_teacher(params: Params, pairs: Path, teacher: Path) -> dict:
    from stages import teacher as stage

    return stage.run(params, stage_paths(teacher.parent, pairs=pairs, teacher=teacher), NullTracker())


def run_cache_teacher(params: Params, pairs: Path, teacher: Path, cache: Path) -> dict:
    from stages import cache_teacher

    paths = stage_paths(cache.parent, pairs=pairs, teacher=teacher, teacher_cache=cache)
    return cache_teacher.run(params, paths, NullTracker())


def make_pairs(root: Path, params: Params) -> Path:
    """Real download (samples) + degrade into root/data; returns root/data/pairs."""
    from stages import degrade, download

    download.run(params, stage_paths(root), NullTracker())
    degrade.run(params, stage_paths(root), NullTracker())
    return root / "data" / "pairs"


def make_teacher_cache(root: Path, params: Params) -> Path:
    """make_pairs, then the real teacher stage and teacher cache into root/models/teacher and root/data/teacher."""
    from stages import cache_teacher, teacher

    make_pairs(root, params)
    teacher.run(params, stage_paths(root), NullTracker())
    cache_teacher.run(params, stage_paths(root), NullTracker())
    return root


@contextlib.contextmanager
def lpips_from_empty_server(folder: Path, monkeypatch):
    """pyiqa's LPIPS weight URLs pointed at a local server holding none of them: downloads fail, offline."""
    from sharpkd import metrics as M

    folder.mkdir(exist_ok=True)
    with serve_folder(folder) as base:
        files = {
            k: M.WeightFile(f.filename, base + f.filename, f.cache_subdir, f.hash_prefix)
            for k, f in M._lpips_files().items()
        }
        monkeypatch.setattr(M, "_lpips_files", lambda: files)
        yield


class serve_folder:
    """Serve `folder` over HTTP on 127.0.0.1 (a free port) in a thread: `with serve_folder(p) as base_url:`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __enter__(self) -> str:
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Quiet, directory=str(self.folder))
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------- video clips (moved from the library)


def write_clip(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int = 30,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
    audio: bool = False,
) -> Path:
    """A clip of HxWx3 uint8 RGB `frames` , in `pix_fmt` (default: yuv420p, yuv444p
    for an odd size); `audio`: with a 440 Hz stereo AAC track as long as the video, interleaved with it."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=fps)
        v.height, v.width = first.shape[:2]
        v.pix_fmt = pix_fmt or ("yuv444p" if v.width % 2 or v.height % 2 else "yuv420p")
        v.options = options or {}
        tone = _Tone(out) if audio else None
        for i, rgb in enumerate(itertools.chain([first], frames)):
            out.mux(v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
            if tone is not None:
                tone.until((i + 1) / fps)
        out.mux(v.encode(None))
        if tone is not None:
            tone.finish()
    return path


class _Tone:
    """A 440 Hz stereo AAC stream, written in 1024-sample frames."""

    def __init__(self, out, rate: int = 44100):
        self.out, self.rate, self.done = out, rate, 0
        self.stream = out.add_stream("aac", rate=rate)
        self.stream.layout = "stereo"

    def until(self, seconds: float) -> None:
        while self.done + 1024 <= seconds * self.rate:
            t = np.arange(self.done, self.done + 1024) / self.rate
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = self.rate, self.done
            self.out.mux(self.stream.encode(frame))
            self.done += 1024

    def finish(self) -> None:
        self.out.mux(self.stream.encode(None))
