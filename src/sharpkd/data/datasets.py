"""Training batches and validation images read from the degrade / cache_teacher outputs.

Batches are a pure function of (seed, step, rank): a resumed or distributed run
draws exactly the patches an uninterrupted single-process run would assign it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sharpkd.errors import UserError
from sharpkd.images import read_rgb, to_tensor

# key -> file in data/pairs (or data/teacher)
PAIR_FILES = {"hr": "train_hr.npy", "lr": "train_lr.npy", "input": "train_input.npy"}
TEACHER_FILES = {"teacher": "train_out.npy", "feat": "train_feat.npy"}


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} not found; run the stage that produces it (`dvc repro`)")
    return np.load(path, mmap_mode="r")


class TrainPatches:
    """Memory-mapped training arrays; `keys` picks which ones a run needs."""

    def __init__(
        self, pairs_dir: str | Path = "data/pairs", teacher_dir: str | Path | None = None, keys=("hr", "lr")
    ):
        self.arrays: dict[str, np.ndarray] = {}
        for key in keys:
            if key in PAIR_FILES:
                self.arrays[key] = _load(Path(pairs_dir) / PAIR_FILES[key])
            elif key in TEACHER_FILES:
                if teacher_dir is None:
                    raise ValueError(f"{key} needs teacher_dir")
                self.arrays[key] = _load(Path(teacher_dir) / TEACHER_FILES[key])
            else:
                raise ValueError(f"unknown array {key!r}")
        lengths = {k: len(a) for k, a in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise UserError(
                f"training arrays are not aligned (lengths {lengths}); rerun `dvc repro` from degrade"
            )
        self.n = next(iter(lengths.values()))
        if self.n == 0:
            raise UserError(f"{pairs_dir}: no training patches")

    def __len__(self) -> int:
        return self.n

    def batch_fn(
        self, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> Callable[[int], dict[str, torch.Tensor]]:
        shard = np.arange(rank, self.n, world)

        def batch(step: int) -> dict[str, torch.Tensor]:
            rng = np.random.default_rng([seed, step, rank])
            idx = np.sort(rng.choice(shard, size=batch_size, replace=len(shard) < batch_size))
            flips = rng.integers(0, 8, size=batch_size)  # one of the 8 dihedral transforms per sample
            out = {}
            for key, arr in self.arrays.items():
                rows = arr[idx]
                t = to_tensor(rows) if rows.dtype == np.uint8 else torch.from_numpy(rows).float()
                out[key] = torch.stack([_dihedral(t[i], int(f)) for i, f in enumerate(flips)])
            return out

        return batch


def _dihedral(t: torch.Tensor, k: int) -> torch.Tensor:
    if k & 4:
        t = t.flip(-1)
    return torch.rot90(t, k & 3, dims=(-2, -1))


@dataclass
class ValidImage:
    name: str
    hr: np.ndarray
    lr: np.ndarray
    input: np.ndarray
    teacher: np.ndarray | None


def load_valid(
    pairs_dir: str | Path = "data/pairs", teacher_dir: str | Path | None = None
) -> list[ValidImage]:
    """Whole validation images (uint8 RGB), in manifest order."""
    pairs_dir = Path(pairs_dir)
    manifest = pairs_dir / "valid_manifest.csv"
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; run `dvc repro degrade`")
    # Names stay strings: DIV2K's "0801" must not become 801.
    names = pd.read_csv(manifest, dtype={"name": str}, keep_default_na=False)["name"].tolist()
    images = []
    for name in names:
        teacher = None
        if teacher_dir is not None:
            teacher = read_rgb(Path(teacher_dir) / "valid" / f"{name}.png")[0]
        images.append(
            ValidImage(
                name=name,
                hr=read_rgb(pairs_dir / "valid" / "hr" / f"{name}.png")[0],
                lr=read_rgb(pairs_dir / "valid" / "lr" / f"{name}.png")[0],
                input=read_rgb(pairs_dir / "valid" / "input" / f"{name}.png")[0],
                teacher=teacher,
            )
        )
    return images
