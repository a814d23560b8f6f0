"""Training batches and validation images read from the degrade / cache_teacher outputs.

Training data are whole images, each kind stored as one flat memory-mapped array per
quantity (the flat image store, data/store.py; docs/architecture.md): the labelled images (HR, clean LR, the student's degraded
input; the teacher's output and LR-grid features) and the teacher-only inputs (no HR: the
teacher's input, the student's input, the teacher's output and features). A batch is
`patch_size` (data.patch_size) crops drawn at random from them, aligned on the LR grid (the HR crop
starts at a multiple of data.scale), each under one of the 8 dihedral transforms, the same
for every quantity of a crop. Batches are a pure function of (seed, step, rank): a resumed
or distributed run draws exactly the crops an uninterrupted single-process run would
assign it, and DDP ranks draw from disjoint images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sharpkd.data.store import load_flat, open_images
from sharpkd.deploy.images import read_rgb
from sharpkd.errors import UserError

# key -> file in data/pairs (PAIR) or data/teacher (TEACHER), for the labelled images ("train")
# and the teacher-only inputs ("teacher_only"). "lr" of a teacher-only input is what the teacher saw.
PAIR_FILES = {
    "train": {"hr": "train_hr.npy", "lr": "train_lr.npy", "input": "train_input.npy"},
    "teacher_only": {"lr": "teacher_only_lr.npy", "input": "teacher_only_input.npy"},
}
TEACHER_FILES = {
    "train": {"teacher": "train_out.npy", "feat": "train_feat.npy"},
    "teacher_only": {"teacher": "teacher_only_out.npy", "feat": "teacher_only_feat.npy"},
}
MANIFESTS = {"train": "train_manifest.csv", "teacher_only": "teacher_only_manifest.csv"}
LR_GRID = ("lr", "feat")  # keys on the LR grid; the others are on the output (HR) grid
KEYS = ("hr", "lr", "input", "teacher", "feat")


def read_pairs_info(pairs_dir: str | Path) -> dict:
    path = Path(pairs_dir) / "pairs.json"
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro degrade`")
    return json.loads(path.read_text())


def image_sizes(pairs_dir: str | Path, kind: str, scale: int) -> np.ndarray:
    """(n, 2) LR-grid (height, width) of each image of `kind` ("train" or "teacher_only"), in manifest order.

    train_manifest.csv gives the HR size (a multiple of scale), teacher_only_manifest.csv the teacher input's size.
    """
    path = Path(pairs_dir) / MANIFESTS[kind]
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro degrade`")
    man = pd.read_csv(path, usecols=["width", "height"])
    hw = man[["height", "width"]].to_numpy(np.int64).reshape(-1, 2)
    return hw // scale if kind == "train" else hw


class ImagePool:
    """Whole images of one kind: per key a flat memory-mapped array holding image after image (HxWxC)."""

    def __init__(self, name: str, lr_sizes: np.ndarray, scale: int, arrays: dict[str, np.ndarray]):
        self.name, self.scale, self.lr_sizes = name, scale, lr_sizes
        self.stores = {
            key: open_images(flat, lr_sizes, 1 if key in LR_GRID else scale, what=f"{name} images: {key}")
            for key, flat in arrays.items()
        }
        self.arrays = {key: store.flat for key, store in self.stores.items()}
        self.channels = {key: store.channels for key, store in self.stores.items()}
        # One HxWxC view per image and key, made once (plain ndarrays over the memory maps: no copy).
        self.views = {key: [store.view(i) for i in range(len(store))] for key, store in self.stores.items()}

    def __len__(self) -> int:
        return len(self.lr_sizes)

    def image(self, key: str, i: int) -> np.ndarray:
        """Image `i` of `key` as an HxWxC view (no copy)."""
        return self.views[key][i]

    def crop(self, key: str, i: int, ly: int, lx: int, lr_side: int) -> np.ndarray:
        """The crop whose LR-grid box is (ly, lx, lr_side); on the output grid it starts at (ly*s, lx*s)."""
        img = self.views[key][i]
        if key in LR_GRID:
            return img[ly : ly + lr_side, lx : lx + lr_side]
        s = self.scale
        return img[ly * s : (ly + lr_side) * s, lx * s : (lx + lr_side) * s]


def teacher_only_count(batch_size: int, fraction: float) -> int:
    """Crops of a batch drawn from teacher-only inputs: round(batch_size * fraction), at least 1 when fraction > 0."""
    if fraction <= 0:
        return 0
    return min(batch_size, max(1, round(batch_size * fraction)))


class TrainPatches:
    """Random aligned crops of the training images; `keys` picks the quantities a run needs.

    With `teacher_only_fraction` > 0 that share of each batch comes from the teacher-only inputs: their
    "hr" is zeros and the batch gets `labelled` (B,) = 1 for labelled crops, 0 for teacher-only ones,
    so the loss terms that need HR can skip them. Every batch also carries `crop` (B, 5) int64:
    pool (0 labelled, 1 teacher-only), image, LR-grid y and x, dihedral transform.
    """

    def __init__(
        self,
        pairs_dir: str | Path = "data/pairs",
        teacher_dir: str | Path | None = None,
        keys=("hr", "lr"),
        *,
        patch_size: int,
        teacher_only_fraction: float = 0.0,
    ):
        unknown = [k for k in keys if k not in KEYS]
        if unknown:
            raise ValueError(f"unknown array {unknown[0]!r}")
        info = read_pairs_info(pairs_dir)
        self.scale, self.patch_size = int(info["scale"]), patch_size
        self.lr_side = self.patch_size // self.scale
        self.keys = tuple(keys)
        self.fraction = teacher_only_fraction
        self.pools = [self._pool(pairs_dir, teacher_dir, "train", self.keys)]
        if teacher_only_fraction > 0:
            if teacher_dir is None:
                raise ValueError(
                    "teacher-only inputs need teacher_dir (the teacher's output is their target)"
                )
            self.pools.append(
                self._pool(pairs_dir, teacher_dir, "teacher_only", tuple(k for k in self.keys if k != "hr"))
            )
        self.n = len(self.pools[0])

    def _pool(self, pairs_dir, teacher_dir, kind: str, keys: tuple[str, ...]) -> ImagePool:
        sizes = image_sizes(pairs_dir, kind, self.scale)
        if len(sizes) == 0:
            raise UserError(f"{Path(pairs_dir) / MANIFESTS[kind]}: no {kind} images")
        small = np.flatnonzero((sizes < self.lr_side).any(axis=1))
        if len(small):
            raise UserError(
                f"{Path(pairs_dir) / MANIFESTS[kind]}: image {int(small[0])} is smaller than a training crop "
                f"(data.patch_size={self.patch_size}); raise data.min_side to at least data.patch_size"
            )
        arrays = {}
        for key in keys:
            if key in PAIR_FILES[kind]:
                arrays[key] = load_flat(Path(pairs_dir) / PAIR_FILES[kind][key], "degrade")
            else:
                if teacher_dir is None:
                    raise ValueError(f"{key} needs teacher_dir")
                arrays[key] = load_flat(Path(teacher_dir) / TEACHER_FILES[kind][key], "cache_teacher")
        return ImagePool(kind, sizes, self.scale, arrays)

    def __len__(self) -> int:
        return self.n

    def batch_fn(
        self, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> Callable[[int], dict[str, torch.Tensor]]:
        counts = [batch_size - teacher_only_count(batch_size, self.fraction)]
        if len(self.pools) > 1:
            counts.append(batch_size - counts[0])
        shards = []
        for pool in self.pools:
            shard = np.arange(rank, len(pool), world)
            if len(shard) == 0:
                raise UserError(
                    f"{len(pool)} {pool.name} images cannot be shared among {world} processes (each needs one)"
                )
            shards.append(shard)
        q, p = self.lr_side, self.patch_size

        def batch(step: int) -> dict[str, torch.Tensor]:
            rng = np.random.default_rng([seed, step, rank])
            crops = []  # (pool, image, ly, lx, dihedral)
            for k, (pool, shard, count) in enumerate(zip(self.pools, shards, counts, strict=True)):
                if count == 0:
                    continue
                images = shard[rng.integers(0, len(shard), size=count)]
                room = pool.lr_sizes[images] - q + 1  # crop positions per axis, on the LR grid
                ys, xs = rng.integers(0, room[:, 0]), rng.integers(0, room[:, 1])
                flips = rng.integers(0, 8, size=count)
                crops += [
                    (k, int(i), int(y), int(x), int(f))
                    for i, y, x, f in zip(images, ys, xs, flips, strict=True)
                ]
            out: dict[str, torch.Tensor] = {}
            for key in self.keys:
                side = q if key in LR_GRID else p
                first = next(pool for pool in self.pools if key in pool.arrays)
                c, dtype = first.channels[key], first.arrays[key].dtype
                # NCHW straight away: each crop is copied once, already transposed and turned.
                arr = np.zeros((len(crops), c, side, side), dtype)
                for b, (k, i, y, x, f) in enumerate(crops):
                    pool = self.pools[k]
                    if key in pool.arrays:  # a teacher-only crop has no "hr": it stays zeros
                        arr[b] = _dihedral(pool.crop(key, i, y, x, q).transpose(2, 0, 1), f)
                t = torch.from_numpy(arr)
                out[key] = t.float().div_(255.0) if dtype == np.uint8 else t.float()
            if len(self.pools) > 1:
                out["labelled"] = torch.tensor([float(c[0] == 0) for c in crops])
            out["crop"] = torch.tensor(crops, dtype=torch.int64)
            return out

        return batch


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 dihedral transforms of a CxHxW array (a view): a horizontal flip when k & 4, then k & 3
    quarter turns (torch.rot90's direction, dims (H, W))."""
    if k & 4:
        a = a[:, :, ::-1]
    return np.rot90(a, k & 3, axes=(1, 2))


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
